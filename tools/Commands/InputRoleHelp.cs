using System.ComponentModel;
using OnnxLora.GraphRewrite.Signature;

namespace OnnxLora.Tools.Commands;

/// <summary>
/// The help of the <c>--input-role NAME=ROLE[:LAYER]</c> flag that rewrite, train, eval, generate, classify and inspect
/// share. The role list comes from <see cref="IoRoles.InputRoles"/>, the list the parser accepts, so help and parser
/// cannot disagree; an attribute rather than a const because a const cannot be computed.
/// </summary>
[AttributeUsage(AttributeTargets.Property)]
internal sealed class InputRoleHelpAttribute(string more = "") : DescriptionAttribute(Text + more)
{
    /// <summary>The help text without <c>more</c>.</summary>
    public static string Text { get; } =
        "The role of an input its name does not tell, NAME=ROLE (repeatable): "
        + string.Join(", ", IoRoles.InputRoles.Where(r => !r.IsPast()).Select(r => r.Name()))
        + ", or " + string.Join(", ", IoRoles.InputRoles.Where(r => r.IsPast()).Select(r => r.Name() + ":LAYER")) + ".";
}
