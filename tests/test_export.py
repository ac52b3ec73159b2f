"""Results people can open: result.zarr read by independent OME-Zarr code, figures, artifacts."""

import asyncio

import numpy as np
import pytest
import yaml
import zarr

from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.stages.export import export_run
from ptycho_core.stages.prepare import prepare
from ptycho_core.stages.segment import run_segment

from helpers import config_with


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_multislice, prefect_api):
    """A two-slice run through the flow (in this process), and the id of its flow run."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.reconstruct import reconstruct

    raw = yaml.safe_load(small_multislice.read_text())
    raw["data"]["path"] = str(small_multislice.parent / "data.h5")
    raw["recon_params"].update(iterations=6, segment_iterations=3)
    run_dir = tmp_path_factory.mktemp("export") / "run"
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        state = reconstruct(raw, str(run_dir), return_state=True)
    assert state.is_completed(), state
    return run_dir, state.state_details.flow_run_id, state.result()


def test_result_zarr_opens_with_independent_readers(finished_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05 import Image

    run_dir, _, summary = finished_run
    ckpt = read_checkpoint(run_dir / "model.hdf5")
    root = zarr.open_group(str(run_dir / "result.zarr"), mode="r")
    objp = ckpt.tensors["objp"].numpy()
    assert np.array_equal(root["object_phase"][:], objp)
    assert np.array_equal(root["probe"][:], ckpt.tensors["probe"].numpy())
    assert root["object_phase"].chunks == (1, 1, 128, 128)
    meta = root.attrs["ptyflow"]
    assert meta["dx_ang"] == ckpt.dx_ang and meta["units"]["object_phase"] == "rad"
    assert meta["config"]["init"]["object"]["n_slices"] == 2 and meta["iteration"] == 6
    assert root["loss/loss"].shape == (6,)

    image = Image.from_zarr(zarr.open_group(str(run_dir / "result.zarr" / "phase_slices"), mode="r"))
    multiscale = image.attributes.ome.multiscales[0]
    assert [a.name for a in multiscale.axes] == ["z", "y", "x"] and multiscale.axes[1].unit == "angstrom"
    assert len(multiscale.datasets) == 3
    scale = multiscale.datasets[0].coordinateTransformations[0].scale
    assert scale == [20.0, ckpt.dx_ang, ckpt.dx_ang]

    nodes = list(Reader(parse_url(str(run_dir / "result.zarr" / "phase_sum")))())
    levels = [np.asarray(level) for level in nodes[0].data]
    assert np.allclose(levels[0], objp[0].sum(0), atol=1e-6)
    assert levels[1].shape == (64, 64) and np.isclose(levels[1][0, 0], objp[0].sum(0)[:2, :2].mean(), atol=1e-6)


def test_figures_are_written(finished_run):
    run_dir, _, summary = finished_run
    names = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert names == ["loss.png", "object_phase.png", "positions.png", "probe_modes.png"]
    from matplotlib.image import imread

    phase = imread(run_dir / "figures" / "object_phase.png")
    assert phase.shape[1] > 2.5 * phase.shape[0]  # sum + 2 slices side by side
    assert phase[..., :3].std() > 0.05  # an image, not a blank canvas


def test_artifacts_can_be_read_back(finished_run, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run_dir, flow_run_id, summary = finished_run

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        artifacts = asyncio.run(read())
    by_type = {a.type: a for a in artifacts}
    assert set(by_type) == {"progress", "table", "markdown"}
    assert float(by_type["progress"].data) == 100.0
    assert "object_phase.png" in by_type["markdown"].data and str(run_dir) in by_type["markdown"].data
    assert "final_loss" in str(by_type["table"].data)


def test_segment_figures_follow_a_running_job_and_the_export_draws_the_last(tmp_path, small_dataset):
    """Figures are rewritten after every segment but the last, whose figures the export draws."""
    cfg = config_with(small_dataset, **{"recon_params.iterations": 4, "recon_params.segment_iterations": 2})
    run_dir = tmp_path / "run"
    prepare(cfg, run_dir)
    figure = run_dir / "figures" / "loss.png"
    run_segment(run_dir, 2)
    assert figure.is_file(), "a running job shows its figures after the first segment"
    first = figure.read_bytes()
    run_segment(run_dir, 4)
    assert figure.read_bytes() == first, "the last segment leaves the figures to the export"
    export_run(run_dir)
    assert figure.read_bytes() != first, "the export draws the final state"
