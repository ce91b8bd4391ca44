"""`lwm env`: Python, lwm, libraries, JAX devices, tools, credentials and disk (``orchestration.environment``)."""

from __future__ import annotations

from orchestration import environment
from orchestration.commands import add_examples, add_json_flag, print_json

MISSING_EXIT = 1


def run(args, extra) -> int:
    doc = environment.report(devices=False)
    if not args.json:  # the fast facts first; JAX's start takes a second or more
        print(environment.format_report(doc), flush=True)
    if not args.no_devices:
        doc["jax"] = environment.jax_devices()
        if not args.json:
            print(environment.format_jax(doc["jax"]))
    missing = environment.problems(doc)
    if args.json:
        print_json({**doc, "problems": missing})
    else:
        print("\n".join(environment.format_problem(p) for p in missing) or "nothing missing")
    return MISSING_EXIT if missing else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "env",
        description="Python, lwm and the key libraries' versions, the gcp extra and whether Google credentials "
        "are configured (never the credentials), ffmpeg and ffprobe, free disk under the current directory, "
        "XLA_FLAGS and JAX's backend and devices. Whatever the README's set-up promises and this machine lacks "
        f"is listed with the command that fixes it, and the exit status is then {MISSING_EXIT}.",
    )
    parser.add_argument("--no-devices", action="store_true", help="skip JAX's backend and devices (JAX not started)")
    add_json_flag(parser, "python, lwm, libraries, gcp {packages, credentials}, tools, disk, env, jax {backend, "
                  "device_count, devices, process_count | error}, problems [{missing, fix}]")
    parser.set_defaults(func=run)
    add_examples(parser,
                 "lwm env                      # everything, for a bug report",
                 "lwm env --json > env.json    # the same as one JSON document",
                 "lwm env --no-devices         # without starting JAX")
