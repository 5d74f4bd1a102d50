"""The scaling report: cost models, the alpha/beta fit, and a short real measurement."""
from __future__ import annotations

import json
import sys

import pytest
from conftest import run_command
from test_metrics_report import png_size

from mpicnn.bench import scale
from mpicnn.cluster.errors import MpicnnError


def test_fit_recovers_alpha_and_beta_of_exact_ring_costs():
    sizes = [2 ** k for k in range(12, 24, 2)]
    for ranks in (2, 4):
        seconds = [scale.ring_seconds(ranks, m, 7e-6, 2e-10) for m in sizes]
        alpha, beta = scale.fit_alpha_beta(sizes, seconds, ranks)
        assert alpha == pytest.approx(7e-6, rel=1e-6) and beta == pytest.approx(2e-10, rel=1e-6)


def test_fit_of_noisy_ring_times_stays_within_the_noise():
    """Times of a known alpha and beta, each off by up to 10 %: the fit is off from them by
    at most 10 % (the true line is), so within 21 % of the true times at every size."""
    sizes = [2 ** k for k in range(12, 24, 2)]
    noise = [0.1, -0.1, 0.07, -0.1, 0.1, -0.04]
    for ranks in (2, 4):
        true = [scale.ring_seconds(ranks, m, 7e-6, 2e-10) for m in sizes]
        seconds = [t * (1 + e) for t, e in zip(true, noise)]
        alpha, beta = scale.fit_alpha_beta(sizes, seconds, ranks)
        fitted = [scale.ring_seconds(ranks, m, alpha, beta) for m in sizes]
        assert max(abs(f / t - 1) for f, t in zip(fitted, seconds)) <= 0.1 + 1e-9
        assert max(abs(f / t - 1) for f, t in zip(fitted, true)) <= 1.1 * 1.1 - 1 + 1e-9
        assert alpha == pytest.approx(7e-6, rel=0.25) and beta == pytest.approx(2e-10, rel=0.25)


def test_fit_balances_the_largest_relative_error():
    sizes = [1e5, 1e6, 1e7]
    seconds = [1.2e-4, 0.8e-3, 1.1e-2]          # no straight line through these
    alpha, beta = scale.fit_alpha_beta(sizes, seconds)
    errors = [scale.ring_seconds(2, m, alpha, beta) / t - 1 for m, t in zip(sizes, seconds)]
    worst = max(map(abs, errors))
    # minimax: the extreme errors are equal in size (alternating signs)
    assert sorted(map(abs, errors))[-2] == pytest.approx(worst, rel=1e-2)
    assert worst < 0.2      # least squares on absolute error gives ~50 % on the smallest


def test_cost_models():
    inter, intra = (10e-6, 1e-9), (1e-6, 1e-10)
    assert scale.ring_seconds(1, 1e6, *inter) == 0.0
    assert scale.ring_seconds(2, 1e6, *inter) == pytest.approx(2 * 10e-6 + 1e6 * 1e-9)
    # one node: hierarchical and flat ring are the same intra-node ring
    assert scale.hierarchical_seconds(8, 1e6, 8, inter, intra) == \
        pytest.approx(scale.flat_ring_seconds(8, 1e6, 8, inter, intra))
    # one rank per node: hierarchical is the inter-node ring
    assert scale.hierarchical_seconds(16, 1e6, 1, inter, intra) == \
        pytest.approx(scale.ring_seconds(16, 1e6, *inter))
    # many nodes: the hierarchy sends 1/8 of the bytes over the slow links
    assert scale.hierarchical_seconds(512, 1e8, 8, inter, intra) < \
        scale.flat_ring_seconds(512, 1e8, 8, inter, intra)
    # a server's link carries every worker's share
    assert scale.ps_seconds(64, 1e6, 4, *inter) == pytest.approx(2 * (4 * 10e-6 + 16e6 * 1e-9))
    rows = scale.predict(0.01, 32, 1e7, inter, intra, 8, 4, 1024)
    assert [r["ranks"] for r in rows] == [2 ** k for k in range(11)]
    for key in ("ring", "hierarchical", "ps"):
        eff = [r[f"{key}_efficiency"] for r in rows]
        assert eff[0] == 1.0 and all(a >= b for a, b in zip(eff, eff[1:]))
    fast = scale.predict(0.01, 32, 1e7, (10e-6, 1 / 25e9), intra, 8, 4, 1024)
    assert fast[-1]["ring_efficiency"] > rows[-1]["ring_efficiency"]


def test_sizes():
    assert scale.parse_bytes("64K") == 65536 and scale.parse_bytes("1.5MiB") == 1572864
    assert scale.parse_bytes("1000") == 1000
    with pytest.raises(MpicnnError, match="--sizes"):
        scale.parse_bytes("lots")
    sizes = scale.probe_sizes(40 * 2 ** 20, short=False)
    assert sizes[0] == 40 * 2 ** 20 // 32 and sizes[-1] <= 40 * 2 ** 20 and len(sizes) == 6
    assert scale.probe_sizes(1000, short=True) == [65536, 262144, 1048576]


@pytest.mark.mpi
def test_short_scaling_report_fits_its_own_measurements(tmp_path, digits):
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    run = run_command([sys.executable, "-m", "mpicnn.bench", "scale", "--short", "--data",
                       str(digits), "--json", str(out), "--plot", str(png),
                       "--alpha", "5e-6", "--bandwidth", "25"], timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    probe = result["probe"]
    assert len(probe["sizes"]) >= 3 and probe["rounds"] >= 5
    # the report's alpha and beta are the fit of its own measurements (how close that fit
    # comes is the fit's property, on synthetic times above, not this machine's)
    alpha, beta = scale.fit_alpha_beta(probe["sizes"], probe["seconds"], probe["ranks"])
    assert (result["alpha"], result["beta"]) == (alpha, beta) and probe["ranks"] == 2
    fitted = [scale.ring_seconds(2, size, alpha, beta) for size in probe["sizes"]]
    assert result["fitted"] == fitted
    assert result["fit_error"] == max(abs(f / m - 1) for f, m in zip(fitted, probe["seconds"]))
    assert result["alpha"] >= 0 and result["beta"] > 0
    assert result["inter"] == pytest.approx([5e-6, 1 / 25e9]) and result["inter_given"]
    assert result["intra"] == pytest.approx([result["alpha"], result["beta"]])
    assert result["gradient_bytes"] == 605224           # digitnet on 1x8x8, float32
    assert [r["ranks"] for r in result["predictions"]] == [2 ** k for k in range(11)]
    assert [m["ranks"] for m in result["measured"]] == [1, 2]
    assert all(m["images_per_s"] > 0 and m["predicted"] > 0 for m in result["measured"])
    for text in ["alpha", "ranks |", "1024 |", "measured here vs predicted", "2 rank(s): measured"]:
        assert text in run.stdout
    assert png_size(png) == (1300, 500)

    # The same measurements on two interconnects that differ only in bandwidth: alpha and
    # the intra-node link are given alike, so no measured value enters either side (the
    # flat ring is paced by the slower of the two links once it spans nodes).
    link = ["--alpha", "5e-6", "--intra-alpha", "1e-6", "--intra-beta", "1e-11"]
    fast, slow = (reuse(out, tmp_path / f"{gbs}gbs.json", *link, "--bandwidth", gbs)
                  for gbs in (25, 1))
    assert fast["probe"] == slow["probe"] == probe and slow["alpha"] == result["alpha"]
    assert fast["inter"] == pytest.approx([5e-6, 1 / 25e9])
    assert slow["inter"] == pytest.approx([5e-6, 1 / 1e9])
    for scheme in ("ring", "hierarchical", "ps"):
        key = f"{scheme}_efficiency"
        assert slow["predictions"][-1][key] < fast["predictions"][-1][key], scheme


def reuse(measured, out, *flags) -> dict:
    """Model the measurements in ``measured`` again (no new measurement); return the JSON."""
    run = run_command([sys.executable, "-m", "mpicnn.bench", "scale", "--reuse", measured,
                       "--plot", "", "--json", out, *flags], timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text())
