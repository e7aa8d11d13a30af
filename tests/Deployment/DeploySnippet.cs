using Microsoft.ML.OnnxRuntime;

namespace OnnxLora.Tests.Deployment;

/// <summary>
/// The plain ONNX Runtime code of docs/DEPLOY.md, compiled and run: only ORT types, no OnnxLora reference.
/// Lines between the markers must stay identical to the documented sample (a test checks).
/// </summary>
static class DeploySnippet
{
    public static float[] Run(string deployPath, string adapterPath, long[] ids)
    {
        // snippet-begin
        using var session = new InferenceSession(deployPath);                  // load the deployable model once
        using var adapter = OrtLoraAdapter.Create(adapterPath, null);          // null on CPU; on CUDA pass the CUDA allocator
        using var input = OrtValue.CreateTensorValueFromMemory(ids, [1, ids.Length]);   // token ids [1, tokens]
        using var runOptions = new RunOptions();                               // one per request
        runOptions.AddActiveLoraAdapter(adapter);                              // leave out for the base model
        using var outputs = session.Run(runOptions, ["input_ids"], [input], ["logits"]);
        float[] logits = outputs[0].GetTensorDataAsSpan<float>().ToArray();    // [1, tokens, vocab]
        // snippet-end
        return logits;
    }
}
