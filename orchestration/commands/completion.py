"""`lwm completion bash|zsh`: a shell completion script generated from the parser (with shtab)."""

from __future__ import annotations

from orchestration.commands import add_examples

SHELLS = ("bash", "zsh")


def run(args, extra) -> int:
    import shtab

    from orchestration import cli  # the whole parser, every group loaded; cli imports this module by name

    print(shtab.complete(cli.build_parser(), shell=args.shell), end="")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "completion",
        description="Print a completion script for SHELL, generated from lwm's own parser: sub-commands and "
        "their flags. Source it from your shell's start-up file (see the examples).",
    )
    parser.add_argument("shell", choices=SHELLS, help="the shell the script is for")
    parser.set_defaults(func=run)
    add_examples(parser,
                 "lwm completion bash > ~/.local/share/bash-completion/completions/lwm   # bash: loaded on demand",
                 "lwm completion zsh > ~/.zfunc/_lwm    # zsh: with fpath+=~/.zfunc before compinit in ~/.zshrc")
