using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// A real, tiny ONNX model with a GPT-style interface: input_ids [batch, tokens] → Gather(embedding) → MatMul(head) →
/// logits [batch, tokens, width]. With width = 50257 it speaks GPT-2's vocabulary; with a small width it is a
/// per-token classification head.
/// </summary>
static class BigramModel
{
    public static string Write(string path, int vocab, int width, int hidden = 8, int seed = 1, int? fixedTokens = null)
    {
        var rng = new Random(seed);
        float[] Values(int n) => Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() * 4 - 2)).ToArray();
        var model = new ModelProto { IrVersion = 8, ProducerName = "test", Graph = new GraphProto { Name = "bigram" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        Dim tokens = fixedTokens is int t ? new Dim(t) : new Dim(null, "tokens");
        g.AddInput(ValueInfos.Tensor("input_ids", DataType.Int64, "batch", tokens));
        g.AddInitializer(Tensors.Float("wte", [vocab, hidden], Values(vocab * hidden)));
        g.AddInitializer(Tensors.Float("head", [hidden, width], Values(hidden * width)));
        var h = g.Op("Gather", ["wte", "input_ids"], "h");           // [batch, tokens, hidden]
        g.AddNode("MatMul", [h, "head"], ["logits"]);                  // [batch, tokens, width]
        g.AddOutput(ValueInfos.Tensor("logits", DataType.Float, "batch", tokens, width));
        OnnxFile.Save(model, path);
        return path;
    }
}
