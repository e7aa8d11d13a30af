using System.Text.RegularExpressions;
using OnnxLora.GraphRewrite.Signature;

namespace OnnxLora.Tests.Tools;

/// <summary>The --input-role help of every command that takes the flag lists exactly the roles the parser accepts.</summary>
public class InputRoleHelpTests
{
    [TestCase("rewrite"), TestCase("train"), TestCase("eval"), TestCase("generate"), TestCase("classify"), TestCase("inspect")]
    public void HelpListsTheRolesTheParserAccepts(string command)
    {
        var (code, output, error) = CliRunner.Run(command, "--help");
        Assert.That(code, Is.Zero, error);
        // the help table wraps descriptions; join the lines back
        var text = Regex.Replace(output, @"\s+", " ");
        var expected = string.Join(", ", IoRoles.InputRoles.Where(r => !r.IsPast()).Select(r => r.Name()))
                       + ", or " + string.Join(", ", IoRoles.InputRoles.Where(r => r.IsPast()).Select(r => r.Name() + ":LAYER"));
        Assert.That(text, Does.Contain("NAME=ROLE (repeatable): " + expected));
        foreach (var role in IoRoles.InputRoles)
            Assert.That(IoRoles.ParseInputRole(role.Name(), "--input-role x"), Is.EqualTo(role), "every listed name parses");
    }
}
