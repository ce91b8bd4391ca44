"""Beam options: offline local default, Dataflow ships this project as a package."""

import subprocess
import sys
import tarfile

from apache_beam.options.pipeline_options import SetupOptions, StandardOptions

from pipelines.kit.beam_runner import LOCAL_RUNNER, PROJECT_ROOT, pipeline_options


def test_local_runs_use_the_offline_runner_and_keep_beam_options():
    options = pipeline_options(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert options.view_as(StandardOptions).runner == LOCAL_RUNNER
    assert options.get_all_options()["direct_num_workers"] == 2


def test_dataflow_runs_ship_the_project_unless_told_otherwise():
    options = pipeline_options(["--runner", "DataflowRunner", "--project", "p", "--region", "r"])
    assert options.view_as(SetupOptions).setup_file == str(PROJECT_ROOT / "pyproject.toml")
    custom = pipeline_options(["--runner", "DataflowRunner", "--setup_file", "/x/setup.py"])
    assert custom.view_as(SetupOptions).setup_file == "/x/setup.py"


def test_the_package_dataflow_workers_install_holds_every_layer(tmp_path):
    # Beam's stager builds exactly this: `python -m build --no-isolation --sdist`.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--outdir", str(tmp_path), str(PROJECT_ROOT)],
                   check=True, capture_output=True)
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    assert {"schemas/packed.py", "pipelines/books.py", "pipelines/kit/packed_writer.py", "orchestration/cli.py"} <= names
