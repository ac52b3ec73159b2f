import faulthandler
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Prefect state of the test session lives in a throw-away home, quiet and offline.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ptyflow-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ptycho_core.config import load_config  # noqa: E402
from ptycho_core.io.preprocess import preprocess  # noqa: E402
from ptycho_core.simulate import simulate  # noqa: E402
from serverkit import free_port, wait  # noqa: E402


EXIT_DEADLINE_S = 300


def pytest_unconfigure(config):
    # a test process still alive this long after its tests ended waits at exit for a stuck thread:
    # print every thread's stack and exit with an error, rather than hang until CI's time runs out
    faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True)


def h5py_lock_is_free() -> bool:
    """Whether another thread can take h5py's global lock (a few tries over about a second, so a
    read in progress elsewhere is not mistaken for a held lock)."""
    from h5py._objects import phil

    def attempt(result: list):
        if phil.acquire(False):
            phil.release()
            result.append(True)

    for _ in range(10):
        result = []
        probe = threading.Thread(target=attempt, args=(result,))
        probe.start()
        probe.join()
        if result:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(autouse=True)
def h5py_lock_left_free():
    """No test may leave h5py's global lock held. A group.items() or .values() iteration left
    suspended by an exception holds it; when the garbage collector later closes it from another
    thread, the lock is never released and that thread deadlocks (a CI run hung at exit so)."""
    yield
    assert h5py_lock_is_free(), "h5py's global lock is still held after this test (a suspended group.items()?)"


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """config.yaml of the 'small' preset, single slice, simulated once per session."""
    return simulate("small", tmp_path_factory.mktemp("small"), seed=1)


@pytest.fixture(scope="session")
def small_multislice(tmp_path_factory) -> Path:
    return simulate("small", tmp_path_factory.mktemp("small_ms"), seed=2, n_slices=2)


@pytest.fixture(scope="session")
def noise_free_dataset(tmp_path_factory) -> Path:
    """The 'small' preset without Poisson noise: the loss can go far down."""
    return simulate("small", tmp_path_factory.mktemp("small_clean"), seed=3, dose_e_per_ang2=None)


@pytest.fixture(scope="session")
def small_prep(small_dataset):
    return preprocess(load_config(small_dataset))


@pytest.fixture
def one_thread():
    """Bitwise comparisons need a single CPU thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*args):
    """The ptyflow command line, as a subprocess argument list."""
    return [sys.executable, "-m", "flows.cli", *map(str, args)]


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect server for the CLI runs that do not test the embedded one themselves."""
    from flows.embedded import prefect_backend

    with prefect_backend() as url:
        yield url


@pytest.fixture
def in_prefect(prefect_api):
    """Flows called in this process report to the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        yield


@pytest.fixture
def run_cli(prefect_api):
    def run(*args, timeout=300):
        env = {**os.environ, "PREFECT_API_URL": prefect_api}
        return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, env=env)
    return run


@pytest.fixture
def server(tmp_path):
    """A real Prefect server on a free local port; yields the environment that points at it."""
    port = free_port()
    # workers start flow runs with the `prefect` found on PATH: this interpreter's, as in an
    # activated environment, whether or not the tests were started from one
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait(healthy, 90, "the Prefect server")
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
