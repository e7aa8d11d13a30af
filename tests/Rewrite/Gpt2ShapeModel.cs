using Onnx;
using OnnxLora.GraphRewrite.Graphs;
using DataType = Onnx.TensorProto.Types.DataType;

namespace OnnxLora.Tests.Rewrite;

/// <summary>
/// The GPT-2-124M graph structure with shape-only weights (dims, no data): enough for discovery, target selection and
/// parameter counting without a 500 MB fixture. Not runnable.
/// </summary>
static class Gpt2ShapeModel
{
    public static ModelProto Build(bool separateQkv, int layers = 12, int channels = 768, int vocab = 50257, int context = 1024)
    {
        var model = new ModelProto { IrVersion = 8, Graph = new GraphProto { Name = "gpt2-shape" } };
        model.OpsetImport.Add(new OperatorSetIdProto { Domain = "", Version = 17 });
        var g = new GraphEditor(model);
        int C = channels;
        void Param(string name, params long[] dims) => g.AddInitializer(Tensors.Raw(name, DataType.Float, dims, []));
        string Linear(string x, string module, long @in, long @out)
        {
            Param(module + ".weight", @in, @out); // Conv1D layout [in, out]
            Param(module + ".bias", @out);
            var y = g.Op("MatMul", [x, module + ".weight"], module);
            return g.Op("Add", [y, module + ".bias"], module + ".add");
        }
        string LayerNorm(string x, string module)
        {
            Param(module + ".weight", C); Param(module + ".bias", C);
            return g.Op("LayerNormalization", [x, module + ".weight", module + ".bias"], module, "", Attr.Int("axis", -1));
        }
        g.AddInput(ValueInfos.Tensor("input_ids", DataType.Int64, "batch", "seq"));
        g.AddInput(ValueInfos.Tensor("position_ids", DataType.Int64, "batch", "seq"));
        Param("transformer.wte.weight", vocab, C);
        Param("transformer.wpe.weight", context, C);
        var h = g.Op("Add", [g.Op("Gather", ["transformer.wte.weight", "input_ids"]), g.Op("Gather", ["transformer.wpe.weight", "position_ids"])], "embed");
        for (int i = 0; i < layers; i++)
        {
            var p = $"transformer.h.{i}";
            var a = LayerNorm(h, p + ".ln_1");
            string q, k, v;
            if (separateQkv)
            {
                q = Linear(a, p + ".attn.q_proj", C, C); k = Linear(a, p + ".attn.k_proj", C, C); v = Linear(a, p + ".attn.v_proj", C, C);
            }
            else
            {
                var qkv = Linear(a, p + ".attn.c_attn", C, 3 * C);
                q = g.Op("Identity", [qkv]); k = g.Op("Identity", [qkv]); v = g.Op("Identity", [qkv]);
            }
            var scores = g.Op("MatMul", [q, g.Op("Transpose", [k], null, "", Attr.Ints("perm", 0, 2, 1))], p + ".attn.scores");
            var ctx = g.Op("MatMul", [g.Op("Softmax", [scores]), v], p + ".attn.context");
            h = g.Op("Add", [h, Linear(ctx, p + ".attn.c_proj", C, C)]);
            var m = LayerNorm(h, p + ".ln_2");
            var f = g.Op("Tanh", [Linear(m, p + ".mlp.c_fc", C, 4 * C)]);
            h = g.Op("Add", [h, Linear(f, p + ".mlp.c_proj", 4 * C, C)]);
        }
        var final = LayerNorm(h, "transformer.ln_f");
        g.AddNode("MatMul", [final, g.Op("Transpose", ["transformer.wte.weight"])], ["logits"], "/lm_head/MatMul");
        g.AddOutput(ValueInfos.Tensor("logits", DataType.Float, "batch", "seq", vocab));
        return model;
    }
}
