"""Sweeps and the watched inbox on a real Prefect server with a real process worker (slow)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ptycho_core.rundir import newest_checkpoint

from ptycho_core.stages.export import run_summary
from ptycho_core.simulate import simulate

from serverkit import deploy_all, descendants, final_states, prefect, wait

pytestmark = pytest.mark.slow


def flow_runs(env, flow_name):
    """[(name, state, expected_start, start, end, parameters)] of every run of a flow, via the API."""
    code = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowFilter, FlowFilterName\n"
        "with get_client(sync_client=True) as c:\n"
        f"    runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=['{flow_name}'])))\n"
        "    print(json.dumps([dict(name=r.name, state=r.state.name if r.state else None,\n"
        "        expected=r.expected_start_time.timestamp() if r.expected_start_time else None,\n"
        "        start=r.start_time.timestamp() if r.start_time else None,\n"
        "        end=r.end_time.timestamp() if r.end_time else None, run_dir=r.parameters.get('run_dir'),\n"
        "        trial=r.parameters.get('trial'))\n"
        "        for r in runs]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def child_runs(env, out):
    """The reconstruct runs whose run directory lies under ``out``, in the order they started."""
    runs = [r for r in flow_runs(env, "reconstruct") if r["run_dir"] and r["run_dir"].startswith(str(out))]
    return sorted(runs, key=lambda r: r["start"] or float("inf"))


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # a process worker stops at once on the second SIGTERM
    proc.wait(timeout=60)


def short_config(small_dataset, tmp_path, iterations=6):
    raw = yaml.safe_load(small_dataset.read_text())
    raw["data"]["path"] = str(small_dataset.parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=iterations, segment_iterations=3)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_on_a_server_respects_the_concurrency_limit(tmp_path, server, small_dataset):
    env = server
    base = short_config(small_dataset, tmp_path)
    (tmp_path / "watch.yaml").write_text(base.read_text())
    deploy_all(env, tmp_path)
    assert prefect("work-pool", "set-concurrency-limit", "ptyflow", "2", env=env).returncode == 0
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        # ---- a 3-point sweep, pool concurrency 2: three child runs, never more than two at once
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"mode": "list", "parameters": {
            "model_params.update_params.objp.lr": [2e-3, 5e-3, 1e-2]}}))
        started = time.time()
        sweep = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", str(base), str(spec), "--out",
                                str(tmp_path / "sweep")], env=env, capture_output=True, text=True, timeout=600)
        sweep_seconds = time.time() - started
        assert sweep.returncode == 0, sweep.stdout + sweep.stderr
        assert sweep.stdout.count(": Completed, loss") == 3, sweep.stdout
        children = child_runs(env, tmp_path / "sweep")
        assert len(children) == 3 and {r["state"] for r in children} == {"Completed"}
        assert most_at_once(children) == 2, children
        assert (tmp_path / "sweep" / "sweep.csv").is_file() and (tmp_path / "sweep" / "sweep_phases.png").is_file()
        latency = [r["start"] - r["expected"] for r in children]
        overhead = [r["end"] - r["start"] for r in children]
        print(f"sweep: {sweep_seconds:.1f} s wall; trigger-to-running {min(latency):.1f}-{max(latency):.1f} s; "
              f"child run wall {min(overhead):.1f}-{max(overhead):.1f} s")

    finally:
        stop(worker)


def most_at_once(runs):
    events = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_an_optuna_sweep_runs_its_trials_as_child_runs_under_the_pool_limit(tmp_path, server, small_dataset):
    """Two trials in flight (spec parallel: 2), pool concurrency 1: the trials are reconstruct
    child runs on the worker, one at a time, each reporting to the study in the SQLite file."""
    import optuna

    env = server
    base = short_config(small_dataset, tmp_path)
    (tmp_path / "watch.yaml").write_text(base.read_text())
    deploy_all(env, tmp_path)
    assert prefect("work-pool", "set-concurrency-limit", "ptyflow", "1", env=env).returncode == 0
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    out = tmp_path / "study"
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"mode": "optuna", "n_trials": 3, "parallel": 2, "parameters": {
            "model_params.update_params.objp.lr": {"low": 2e-3, "high": 2e-2, "log": True}}}))
        sweep = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", str(base), str(spec), "--out", str(out)],
                               env=env, capture_output=True, text=True, timeout=900)
        assert sweep.returncode == 0, sweep.stdout + sweep.stderr
        children = child_runs(env, out)
        assert len(children) == 3 and {r["state"] for r in children} == {"Completed"}, children
        assert all(r["trial"] and r["trial"]["storage"] == f"sqlite:///{out / 'study.db'}" for r in children)
        assert most_at_once(children) == 1
        trials = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}").get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE"] * 3
        assert {t.user_attrs["run_dir"] for t in trials} == {r["run_dir"] for r in children}
        assert all(len(t.intermediate_values) == 1 for t in trials)  # reported at iteration 3 of 6, from the worker
        assert (out / "best_config.yaml").is_file()
    finally:
        stop(worker)


def test_a_sweep_preempted_under_a_worker_finishes_with_one_run_per_point(tmp_path, server, small_dataset):
    """SIGTERM to the sweep's flow run process: Prefect reschedules the sweep, the worker runs it
    again, and the idempotency keys give it back the children it had submitted: three points,
    three reconstruct runs, all Completed."""
    env = server
    base = short_config(small_dataset, tmp_path, iterations=9)
    (tmp_path / "watch.yaml").write_text(base.read_text())
    deploy_all(env, tmp_path)
    workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
               for pool in ("ptyflow", "ptyflow-control")]
    out = tmp_path / "sweep"
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"mode": "list", "wait_hours": 1, "parameters": {
            "model_params.update_params.objp.lr": [2e-3, 5e-3, 1e-2]}}))
        run = prefect("deployment", "run", "sweep/sweep", "--param", f"base_config={base}", "--param",
                      f"spec={spec}", "--param", f"out_dir={out}", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        sweep_id = next(line.split()[-1] for line in run.stdout.splitlines() if "UUID" in line)

        wait(lambda: len(child_runs(env, out)) == 3, 240, "the sweep to submit its three points")
        supervisors = [pid for pid, cmd in descendants(workers[1].pid) if "flow-run execute" in cmd]
        assert supervisors, descendants(workers[1].pid)
        os.kill(supervisors[0], signal.SIGTERM)
        states = wait(lambda: final_states(env, sweep_id), 600, "the sweep to finish")
        assert states[-1] == "Completed" and "AwaitingRetry" in states, states
        finished = child_runs(env, out)
        assert len(finished) == 3 and {r["state"] for r in finished} == {"Completed"}, finished
        assert len({r["run_dir"] for r in finished}) == 3
    finally:
        for worker in workers:
            stop(worker)


def test_an_optuna_sweep_preempted_under_a_worker_lets_its_running_trial_finish(tmp_path, server, small_dataset):
    """SIGTERM to an optuna sweep's process while its trial runs as a child on another worker: the
    rescheduled sweep releases the trial (its process is gone) and retries it in the same run
    directory, but only once the child still running there has ended; the child finishes although
    its trial was released, and the retry takes its score from the finished run."""
    import optuna

    env = server
    base = short_config(small_dataset, tmp_path, iterations=9)
    (tmp_path / "watch.yaml").write_text(base.read_text())
    deploy_all(env, tmp_path)
    # each checkpoint write of the trial's run pauses, so it is still running when the sweep comes back
    slow_writes = {**env, "PTYFLOW_FAULT_PAUSE": "checkpoint_write:12"}
    workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], env=pool_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
               for pool, pool_env in (("ptyflow", slow_writes), ("ptyflow-control", env))]
    out = tmp_path / "study"
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"mode": "optuna", "n_trials": 1, "pruner": "none", "wait_hours": 1,
                                        "parameters": {"model_params.update_params.objp.lr": {"low": 2e-3, "high": 2e-2,
                                                                                               "log": True}}}))
        run = prefect("deployment", "run", "sweep/sweep", "--param", f"base_config={base}", "--param",
                      f"spec={spec}", "--param", f"out_dir={out}", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        sweep_id = next(line.split()[-1] for line in run.stdout.splitlines() if "UUID" in line)
        wait(lambda: [r for r in child_runs(env, out) if r["state"] == "Running"], 240, "the trial's run to start")
        supervisors = [pid for pid, cmd in descendants(workers[1].pid) if "flow-run execute" in cmd]
        assert supervisors, descendants(workers[1].pid)
        os.kill(supervisors[0], signal.SIGTERM)
        states = wait(lambda: final_states(env, sweep_id), 600, "the sweep to finish")
        assert states[-1] == "Completed" and "AwaitingRetry" in states, states

        runs = child_runs(env, out)
        assert [r["state"] for r in runs] == ["Completed", "Completed"], runs
        assert runs[0]["run_dir"] == runs[1]["run_dir"]
        assert runs[1]["start"] >= runs[0]["end"], runs  # never two runs in one directory
        trials = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}").get_trials()
        assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], trials
        retry = trials[1]
        assert retry.system_attrs["failed_trial"] == 0 and retry.params == trials[0].params
        # the retry began while the first child still ran: it waited, and did not start a second run
        assert retry.datetime_start.timestamp() < runs[0]["end"], (retry.datetime_start, runs)
        assert newest_checkpoint(runs[0]["run_dir"]).iteration == 9
        assert retry.value == pytest.approx(run_summary(runs[0]["run_dir"])["validation_loss"])
    finally:
        for worker in workers:
            stop(worker)


def test_watch_on_a_server_reconstructs_each_dataset_once(tmp_path, server, small_dataset):
    env = server
    base = short_config(small_dataset, tmp_path)
    (tmp_path / "watch.yaml").write_text(base.read_text())
    deploy_all(env, tmp_path)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        # ---- two datasets dropped into an inbox, one written slowly, two watchers polling
        inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
        inbox.mkdir()
        watcher_code = (
            "import sys, time\n"
            "from flows.watch import watch\n"
            "end = time.time() + float(sys.argv[4])\n"
            "while time.time() < end:\n"
            "    watch(sys.argv[1], sys.argv[2], sys.argv[3], stable_seconds=3.0)\n"
            "    time.sleep(0.5)\n"
        )
        quiet = {**env, "PREFECT_LOGGING_LEVEL": "WARNING"}
        watchers = [subprocess.Popen([sys.executable, "-c", watcher_code, str(inbox), str(outbox),
                                      str(tmp_path / "watch.yaml"), "300"], env=quiet, cwd=tmp_path,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    for _ in range(2)]
        shutil.copy(small_dataset.parent / "data.h5", inbox / "fast.h5")
        other = simulate("small", tmp_path / "other", seed=11)  # another dataset (other content hash)
        data = (other.parent / "data.h5").read_bytes()
        with open(inbox / "slow.h5", "wb") as fh:  # arrives over ~8 s
            for i in range(8):
                fh.write(data[i * len(data) // 8:(i + 1) * len(data) // 8])
                fh.flush()
                os.fsync(fh.fileno())
                time.sleep(1.0)
        written = time.time()
        try:
            def both_done():
                runs = [r for r in flow_runs(env, "reconstruct") if r["run_dir"] and "/outbox/" in r["run_dir"]]
                return runs if len(runs) >= 2 and all(r["state"] == "Completed" for r in runs) else None
            try:
                runs = wait(both_done, 240, "both inbox datasets to be reconstructed")
            except AssertionError:
                print("state:", (outbox / ".watch-state.json").read_text() if (outbox / ".watch-state.json").is_file() else None)
                print("runs:", flow_runs(env, "reconstruct"), flow_runs(env, "watch")[:3])
                raise
            time.sleep(5)  # let the watchers poll a few more times: nothing may start again
            runs = [r for r in flow_runs(env, "reconstruct") if r["run_dir"] and "/outbox/" in r["run_dir"]]
        finally:
            for w in watchers:
                w.kill()
                w.wait(timeout=30)
                errors = w.stderr.read()
                if errors.strip():
                    print("watcher stderr:", errors[-3000:])
        # one more poll settles the bookkeeping of the finished child runs
        final = subprocess.run([sys.executable, "-c", watcher_code, str(inbox), str(outbox),
                                str(tmp_path / "watch.yaml"), "0.1"], env=quiet, cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
        assert sorted(os.path.basename(r["run_dir"]) for r in runs) == ["fast.h5", "slow.h5"], runs
        slow = next(r for r in runs if r["run_dir"].endswith("slow.h5"))
        assert (outbox / "slow.h5" / "result.zarr").is_dir() and (outbox / "fast.h5" / "result.zarr").is_dir()
        state = json.loads((outbox / ".watch-state.json").read_text())
        assert {k: v["status"] for k, v in state["datasets"].items()} == {"fast.h5": "done", "slow.h5": "done"}
        assert slow["expected"] >= written  # not started on a partial file
    finally:
        stop(worker)


def flow_run_state(env, flow_run_id):
    """(state type, state message) of a flow run, via the API."""
    code = (
        "from uuid import UUID\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        f"    s = c.read_flow_run(UUID('{flow_run_id}')).state\n"
        "    print(s.type.value); print(s.message or '')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kind, _, message = out.stdout.partition("\n")
    return kind.strip(), message.strip()


def test_a_run_whose_node_died_is_crashed_by_the_server_and_the_inbox_retries_it(tmp_path, server, small_dataset):
    """The worker and its flow run are SIGKILLed together (a lost node): nothing is left to report
    the run, so only its stopped heartbeats tell. The automation of `ptyflow setup-server` sets
    it Crashed without anyone rerunning anything; the watch flow then counts a failed attempt,
    submits the dataset again and a new worker finishes it."""
    env = server
    base = short_config(small_dataset, tmp_path, iterations=6)
    (tmp_path / "watch.yaml").write_text(base.read_text())
    deploy_all(env, tmp_path)
    setup = subprocess.run([sys.executable, "-m", "flows.cli", "setup-server", "--heartbeat-seconds", "30"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0 and "created" in setup.stdout, setup.stdout + setup.stderr
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    shutil.copy(small_dataset.parent / "data.h5", inbox / "scan.h5")
    poll_code = ("import sys\nfrom flows.watch import watch\n"
                 "watch(sys.argv[1], sys.argv[2], sys.argv[3], stable_seconds=0.5, max_attempts=2)\n")
    quiet = {**env, "PREFECT_LOGGING_LEVEL": "WARNING"}

    def poll():
        done = subprocess.run([sys.executable, "-c", poll_code, str(inbox), str(outbox), str(tmp_path / "watch.yaml")],
                              env=quiet, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads((outbox / ".watch-state.json").read_text())["datasets"].get("scan.h5", {})

    # the first node's run holds still in its export (a fault-injection pause) until the node dies
    node = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow"],
                            env={**env, "PTYFLOW_FAULT_PAUSE": "export:900"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    second = None
    try:
        time.sleep(1.0)
        poll()  # the dataset is seen: size noted
        time.sleep(1.0)
        submitted = poll()
        assert submitted.get("status") == "submitted", submitted
        run_id = submitted["flow_run_id"]
        wait(lambda: list((outbox / "scan.h5" / "checkpoints").glob("iter_000006.h5")), 240, "the iterations")
        assert flow_run_state(env, run_id)[0] == "RUNNING"
        time.sleep(35)  # in the export's pause; at least one heartbeat sent
        for pid in [node.pid] + [pid for pid, _ in descendants(node.pid)]:  # the worker and all it started
            os.kill(pid, signal.SIGKILL)
        node.wait()
        died = time.time()
        crashed = wait(lambda: flow_run_state(env, run_id)[0] == "CRASHED" and flow_run_state(env, run_id), 240,
                       "the server to mark the dead run Crashed")
        print(f"marked Crashed {time.time() - died:.0f} s after the kill: {crashed[1]}")
        assert "no heartbeat for 90 s" in crashed[1], crashed

        second = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        entry = None
        deadline = time.time() + 300
        while time.time() < deadline:
            entry = poll()
            if entry.get("status") in ("done", "failed"):
                break
            time.sleep(3)
        assert entry and entry.get("status") == "done", entry
        runs = [r for r in flow_runs(env, "reconstruct") if r["run_dir"] and "/outbox/" in r["run_dir"]]
        assert sorted(r["state"] for r in runs) == ["Completed", "Crashed"], runs
    finally:
        for proc in (node, second):
            if proc is not None and proc.poll() is None:
                stop(proc)


def base_config(dataset_config, path, iterations=6):
    """A short run of ``dataset_config``'s data, written to ``path``."""
    raw = yaml.safe_load(dataset_config.read_text())
    raw["data"]["path"] = str(dataset_config.parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=iterations, segment_iterations=3)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_same_optuna_spec_on_a_second_dataset_runs_that_dataset_s_own_trial(tmp_path, server, small_dataset):
    """The natural facility use: one tuning spec, applied to dataset A and then to dataset B. Each
    sweep has its own SQLite study (study id 1 in both) and the seeded sampler draws the same
    first point, so a key made of those alone handed B's trial A's finished run. B's trial must
    run on B's data, in B's folder, and be scored there."""
    import optuna

    env = server
    (tmp_path / "watch.yaml").write_text(base_config(small_dataset, tmp_path / "base_a.yaml").read_text())
    other = simulate("small", tmp_path / "other", seed=11)
    bases = {"a": tmp_path / "base_a.yaml", "b": base_config(other, tmp_path / "base_b.yaml")}
    deploy_all(env, tmp_path)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"mode": "optuna", "n_trials": 1, "pruner": "none", "wait_hours": 1,
                                        "parameters": {"model_params.update_params.objp.lr": {"low": 2e-3, "high": 2e-2,
                                                                                               "log": True}}}))
        trials = {}
        for name, base in bases.items():
            out = tmp_path / f"study_{name}"
            sweep = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", str(base), str(spec), "--out", str(out)],
                                   env=env, capture_output=True, text=True, timeout=600)
            assert sweep.returncode == 0, sweep.stdout + sweep.stderr
            trials[name] = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}").get_trials()
        assert trials["a"][0].params == trials["b"][0].params  # the collision's precondition: the same first point
        runs = child_runs(env, tmp_path / "study_b")
        assert len(runs) == 1 and runs[0]["state"] == "Completed", runs
        run_dir = runs[0]["run_dir"]
        assert trials["b"][0].state.name == "COMPLETE" and trials["b"][0].user_attrs["run_dir"] == run_dir
        assert yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["data"]["path"] == str(other.parent / "data.h5")
        assert trials["b"][0].value == pytest.approx(run_summary(run_dir)["validation_loss"])
        assert len(child_runs(env, tmp_path / "study_a")) == 1
    finally:
        stop(worker)


def test_the_same_inbox_file_with_another_template_is_reconstructed_again(tmp_path, server, small_dataset):
    """One dataset, watched into an outbox with one template, then into another outbox with a
    second template (fewer iterations): a key made of the content hash and the attempt alone
    handed the second poll the first run, and the dataset was recorded done with nothing in the
    second outbox."""
    env = server
    template_a = base_config(small_dataset, tmp_path / "watch.yaml", iterations=6)
    template_b = base_config(small_dataset, tmp_path / "template_b.yaml", iterations=3)
    deploy_all(env, tmp_path)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(small_dataset.parent / "data.h5", inbox / "scan.h5")
    (inbox / "scan.h5.done").touch()
    poll_code = ("import sys\nfrom flows.watch import watch\n"
                 "watch(sys.argv[1], sys.argv[2], sys.argv[3], stable_seconds=0.0)\n")
    quiet = {**env, "PREFECT_LOGGING_LEVEL": "WARNING"}

    def watched_until_final(outbox, template):
        entry, deadline = {}, time.time() + 300
        while time.time() < deadline and entry.get("status") not in ("done", "failed"):
            done = subprocess.run([sys.executable, "-c", poll_code, str(inbox), str(outbox), str(template)],
                                  env=quiet, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            entry = json.loads((outbox / ".watch-state.json").read_text())["datasets"].get("scan.h5", {})
            time.sleep(2)
        return entry

    try:
        assert watched_until_final(tmp_path / "outbox_a", template_a)["status"] == "done"
        assert watched_until_final(tmp_path / "outbox_b", template_b)["status"] == "done"
        runs = {os.path.dirname(r["run_dir"]): r for r in flow_runs(env, "reconstruct") if r["run_dir"]}
        assert sorted(runs) == [str(tmp_path / "outbox_a"), str(tmp_path / "outbox_b")], runs
        assert {r["state"] for r in runs.values()} == {"Completed"}
        assert newest_checkpoint(tmp_path / "outbox_a" / "scan.h5").iteration == 6
        assert newest_checkpoint(tmp_path / "outbox_b" / "scan.h5").iteration == 3
        assert (tmp_path / "outbox_b" / "scan.h5" / "result.zarr").is_dir()
    finally:
        stop(worker)
