"""The command line as a user meets it: demo, simulate, inspect."""

import json
import re
import time
from pathlib import Path

import h5py
import yaml
import zarr


def test_demo_reconstructs_and_reports_quality(tmp_path, run_cli):
    started = time.perf_counter()
    result = run_cli("demo", "--out", tmp_path / "demo")
    wall_s = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    # the timing line's parts are parts of the run: together no longer than the process took
    timing = re.search(r"^timing: (.*)$", result.stdout, re.MULTILINE).group(1)
    parts = {name: float(seconds) for name, seconds in re.findall(r"([^,]+?) ([0-9.]+) s(?:,|$)", timing)}
    assert "start-up and imports" in {name.strip() for name in parts}, timing
    assert 0 < sum(parts.values()) <= wall_s, (timing, wall_s)
    pearson = float(re.search(r"phase Pearson vs ground truth: ([0-9.]+)", result.stdout).group(1))
    assert pearson >= 0.9, result.stdout
    # the scan's error on one line: the demo's raster is exact, so the step read is within 1 %
    step = re.search(r"^scan: step ([-+0-9.]+) % \(y\), ([-+0-9.]+) % \(x\)", result.stdout, re.MULTILINE)
    assert step and max(abs(float(step.group(1))), abs(float(step.group(2)))) < 1.0, result.stdout
    run_dir = tmp_path / "demo" / "run"
    assert f"result:  {run_dir / 'result.zarr'}" in result.stdout
    root = zarr.open_group(str(run_dir / "result.zarr"), mode="r")
    assert root["object_phase"].shape[:2] == (1, 1)
    assert root.attrs["ptyflow"]["iteration"] == 30
    for name in ("object_phase", "probe_modes", "loss", "positions"):
        assert (run_dir / "figures" / f"{name}.png").stat().st_size > 1000


def test_simulate_writes_data_truth_and_a_config(tmp_path, run_cli):
    result = run_cli("simulate", "--out", tmp_path, "--preset", "small", "--slices", "3", "--seed", "4")
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "data.h5", "r") as f:
        assert f["meas"].shape == (16, 16, 64, 64)
        assert f["ground_truth/objp"].shape[:2] == (1, 3)
        assert f.attrs["energy_kev"] == 300.0 and f["positions_ang"].shape == (256, 2)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["init"]["object"]["n_slices"] == 3
    bad = run_cli("simulate", "--out", tmp_path, "--preset", "huge")
    assert bad.returncode == 2 and "--preset: 'huge' is not one of small, medium" in bad.stderr


def test_inspect_json_has_stable_keys(tmp_path, run_cli, small_dataset):
    cfg = yaml.safe_load(small_dataset.read_text())
    cfg["data"]["path"] = str(small_dataset.parent / "data.h5")
    cfg["recon_params"].update(iterations=4, segment_iterations=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli("run", tmp_path / "c.yaml", "--run-dir", tmp_path / "run").returncode == 0
    report = json.loads(run_cli("inspect", tmp_path / "run", "--json").stdout)
    assert {k: report[k] for k in ("kind", "iteration", "target_iteration", "finished", "segments_done", "export")} == {
        "kind": "run_dir", "iteration": 4, "target_iteration": 4, "finished": True, "segments_done": 2, "export": True}
    assert [c["file"] for c in report["checkpoints"]] == ["iter_000002.h5", "iter_000004.h5"]
    assert report["locked_by"] is None and report["stale_lock"] is None  # a finished run lets go cleanly
    ckpt = json.loads(run_cli("inspect", tmp_path / "run" / "model.hdf5", "--json").stdout)
    assert ckpt["kind"] == "checkpoint" and ckpt["tensors"]["probe"] == [1, 64, 64]
    result = json.loads(run_cli("inspect", tmp_path / "run" / "result.zarr", "--json").stdout)
    assert result["kind"] == "result" and result["iteration"] == 4
    missing = run_cli("inspect", tmp_path / "nowhere")
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr


def test_the_embedded_server_says_when_it_cannot_be_tied_to_ptyflow(monkeypatch, capfd):
    """PR_SET_PDEATHSIG is what makes the embedded server die with a killed ptyflow; if it cannot
    be set, a warning says so (it used to be silent)."""
    import ctypes

    from flows import embedded

    monkeypatch.delenv("PREFECT_API_URL", raising=False)

    def no_libc(*args, **kwargs):
        raise OSError("no libc here")

    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(ctypes, "CDLL", no_libc)  # the forked child sees the same module state
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # whatever server the session uses
        with embedded.prefect_backend() as url:
            assert url.startswith("http://127.0.0.1:")
    assert "PR_SET_PDEATHSIG could not be set" in capfd.readouterr().err


def test_the_embedded_server_starts_before_prefect_is_imported_and_ends_if_a_profile_names_a_server(tmp_path):
    """The embedded server takes seconds to come up, so it starts before Prefect (1.3 s) is
    imported, decided from the environment alone; when Prefect's settings then name a server
    (here a profile), the embedded one is stopped at once and no process is left behind."""
    import os
    import subprocess
    import sys
    import textwrap

    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "facility"\n\n[profiles.facility]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    code = textwrap.dedent("""
        import sys
        import flows.cli
        assert "prefect" not in sys.modules, "importing the CLI imported Prefect"
        from flows.embedded import EmbeddedServer, start_embedded_server
        seen = []
        original = EmbeddedServer.__init__
        def watched(self):
            seen.append("prefect" in sys.modules)
            original(self)
            seen.append(self.proc)
        EmbeddedServer.__init__ = watched
        assert start_embedded_server() is None, "the profile's server should be used"
        prefect_was_imported, proc = seen
        assert not prefect_was_imported, "the server should start before Prefect is imported"
        print("server exit code", proc.wait(timeout=15))
    """)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_PROFILES_PATH": str(profiles)}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "server exit code 0" in out.stdout  # a clean shutdown: its stdin was closed


def test_prefect_settings_that_do_not_load_are_one_error_and_leave_no_server(tmp_path, small_dataset):
    """The embedded server is started before Prefect's settings are read; settings that fail to
    validate (here a profile's API URL that is a number) end the run with one line naming the
    setting, exit 2, and the speculative server is stopped."""
    import os
    import subprocess
    import sys
    import time

    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "broken"\n\n[profiles.broken]\nPREFECT_API_URL = 5\n')
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_PROFILES_PATH": str(profiles)}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(small_dataset), "--run-dir",
                          str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: Prefect settings: url: Input should be a valid string (got 5)" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
    time.sleep(0.5)
    assert not servers_using(tmp_path / "home"), "the embedded server outlived the error"


def servers_using(prefect_home) -> list[int]:
    """Living embedded Prefect servers whose environment names this PREFECT_HOME."""
    from serverkit import processes, with_environment

    table = processes()
    return [pid for pid in with_environment("PREFECT_HOME", prefect_home) if "flows.embedded" in table.get(pid, (0, ""))[1]]


def test_out_of_memory_in_the_optimizer_update_is_one_line_and_exit_6(tmp_path, small_dataset, prefect_api):
    """An out-of-memory error that a smaller batch cannot help (here inside Adam's update, injected
    on the CPU) ends `ptyflow run` with one line and exit code 6, not a traceback."""
    import os
    import subprocess
    import sys
    import textwrap

    config = tmp_path / "config.yaml"
    raw = yaml.safe_load(small_dataset.read_text())
    raw["data"]["path"] = str(small_dataset.parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=4, segment_iterations=2)
    config.write_text(yaml.safe_dump(raw))
    code = textwrap.dedent(f"""
        import sys, torch
        def no_memory(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        torch.optim.Adam.step = no_memory
        sys.argv = ["ptyflow", "run", {str(config)!r}, "--run-dir", {str(tmp_path / "run")!r}]
        from flows.cli import console_main
        console_main()
    """)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PREFECT_API_URL": prefect_api},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 6, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("out of memory: out of memory in the optimizer's update"), lines
