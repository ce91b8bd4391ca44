"""What this machine offers the workflow: ``lwm env``'s report, for set-up checks and bug reports.

``report()`` gathers, in order: Python and lwm, the key libraries' versions (read
from package metadata, nothing imported), the ``gcp`` extra and where Google
credentials would come from (never their content), ffmpeg and ffprobe, free disk
under the current directory, then JAX's backend and devices (the one slow step:
JAX is imported and starts its backends). ``problems()`` lists what the README's
set-up promises and this machine lacks, each with the command that fixes it.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata

# The libraries a bug report needs, by distribution name (as `pip` names them).
LIBRARIES = ("jax", "jaxlib", "flax", "orbax-checkpoint", "grain", "array-record", "apache-beam", "sentencepiece")
GCP_EXTRA = ("google-cloud-storage", "gcsfs")
TOOLS = ("ffmpeg", "ffprobe")
INSTALL = "pip install -e ."  # run from the repository; `make venv` does it too
ADC_FILE = os.path.join("~", ".config", "gcloud", "application_default_credentials.json")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def google_credentials(env=os.environ) -> str | None:
    """Where Google credentials would come from (a description, never the credentials), or None."""
    path = env.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        return "GOOGLE_APPLICATION_CREDENTIALS (file found)" if os.path.isfile(path) else \
            "GOOGLE_APPLICATION_CREDENTIALS (file missing)"
    if os.path.isfile(os.path.expanduser(ADC_FILE)):
        return "gcloud application-default credentials"
    if env.get("GCE_METADATA_HOST") or _on_google_cloud_vm():
        return "the Compute Engine metadata server (this VM's service account)"
    return None


def _on_google_cloud_vm() -> bool:
    """A Compute Engine (or TPU) VM, from the firmware's product name, as Google's auth library checks it."""
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().strip().startswith("Google")
    except OSError:
        return False


def jax_devices() -> dict:
    """JAX's backend and devices (imports JAX), or the error that stopped it."""
    try:
        import jax

        devices = jax.devices()
    except Exception as error:  # noqa: BLE001 - a report shows any failure, it does not raise it
        return {"backend": None, "devices": [], "error": f"{type(error).__name__}: {error}"}
    return {"backend": jax.default_backend(), "device_count": len(devices),
            "devices": sorted({d.device_kind for d in devices}), "process_count": jax.process_count()}


def report(*, devices: bool = True, directory: str = ".") -> dict:
    """Everything ``lwm env`` shows; ``devices=False`` skips JAX's start."""
    free = shutil.disk_usage(directory).free
    doc = {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "lwm": package_version("lwm-workflow"),
        "libraries": {name: package_version(name) for name in LIBRARIES},
        "gcp": {"packages": {name: package_version(name) for name in GCP_EXTRA},
                "credentials": google_credentials()},
        "tools": {name: shutil.which(name) for name in TOOLS},
        "disk": {"directory": os.path.abspath(directory), "free_gib": round(free / 2**30, 1)},
        "env": {name: os.environ.get(name) for name in ("XLA_FLAGS", "JAX_PLATFORMS")},
    }
    if devices:
        doc["jax"] = jax_devices()
    return doc


def problems(doc: dict) -> list[dict]:
    """What the README's set-up promises and ``doc`` lacks: ``{"missing": ..., "fix": ...}`` each."""
    found = []
    if doc["lwm"] is None:
        found.append({"missing": "the lwm-workflow package", "fix": INSTALL})
    for name, version in doc["libraries"].items():
        if version is None:
            found.append({"missing": f"Python package {name}", "fix": INSTALL})
    for name, path in doc["tools"].items():
        if path is None:
            found.append({"missing": f"{name} on PATH (video jobs and the demo)",
                          "fix": "make system-packages (or: sudo apt-get install ffmpeg)"})
    if doc.get("jax", {}).get("error"):
        found.append({"missing": f"a working JAX backend ({doc['jax']['error']})",
                      "fix": "check JAX_PLATFORMS and the jax[...] extra for this accelerator"})
    return found


def format_report(doc: dict) -> str:
    """The text ``lwm env`` prints for ``doc``, one fact a line (JAX's line when ``doc`` holds it)."""

    def shown(value) -> str:
        return "not installed" if value is None else str(value)

    lines = [f"python           {doc['python']['version']} ({doc['python']['executable']})",
             f"lwm              {shown(doc['lwm'])}"]
    lines += [f"{name:<17}{shown(version)}" for name, version in doc["libraries"].items()]
    gcp = doc["gcp"]
    lines.append("gcp extra        " + ", ".join(f"{n} {shown(v)}" for n, v in gcp["packages"].items()))
    lines.append(f"credentials      {gcp['credentials'] or 'none configured (gs:// paths need them)'}")
    lines += [f"{name:<17}{path or 'not found'}" for name, path in doc["tools"].items()]
    lines.append(f"disk             {doc['disk']['free_gib']} GiB free under {doc['disk']['directory']}")
    lines += [f"{name:<17}{value if value is not None else '(unset)'}" for name, value in doc["env"].items()]
    if "jax" in doc:
        lines.append(format_jax(doc["jax"]))
    return "\n".join(lines)


def format_jax(info: dict) -> str:
    if info.get("error"):
        return f"jax backend      error: {info['error']}"
    return (f"jax backend      {info['backend']}, {info['device_count']} device(s) ({', '.join(info['devices'])}), "
            f"{info['process_count']} process(es)")


def format_problem(problem: dict) -> str:
    return f"missing: {problem['missing']}; fix: {problem['fix']}"
