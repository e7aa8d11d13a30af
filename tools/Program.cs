using OnnxLora.Tools;

return Cli.Run(args);
