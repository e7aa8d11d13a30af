namespace OnnxLora.Tools.Commands;

/// <summary>The help of the <c>--input-role NAME=ROLE[:LAYER]</c> flag that rewrite, train, eval, generate, classify and inspect share.</summary>
internal static class InputRoleHelp
{
    public const string Text = "The role of an input its name does not tell, NAME=ROLE (repeatable): input_ids, attention_mask, position_ids, " +
                               "token_type_ids, cache_position, or past_key:LAYER, past_value:LAYER, past_key_value:LAYER.";
}
