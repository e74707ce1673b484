"""benchmarks/peers.py: the script runs end to end on tiny sizes, and each installed peer, configured as the
script configures it, computes the same loss as metricloss (peers that are not installed are skipped)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import peers  # noqa: E402

INSTALLED = [p for p in peers.PEERS if peers.peer_status(p) is None]
MATCHED = [(p, m) for (p, m), red in peers.MATCH.items() if red is not None]


def test_help():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "peers.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    for flag in ("--sizes", "--dim", "--repeats", "--threads", "--minings", "--out", "--ties"):
        assert flag in p.stdout


# half a minute on 2 cores (subprocess per case); the peers' parity with metricloss is tested per loss elsewhere
@pytest.mark.slow
def test_script_runs_tiny_sizes(tmp_path):
    out, raw = tmp_path / "peers.md", tmp_path / "peers.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "peers.py"), "--sizes", "16", "--dim", "8", "--repeats",
           "1", "--minings", "batch_hard", "semi_hard", "--out", str(out), "--json-out", str(raw)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    md = out.read_text()
    assert md in p.stdout and "| batch_hard | 16 | metricloss |" in md and "| semi_hard | 16 | metricloss |" in md
    rows = json.loads(raw.read_text())
    by = {(r["lib"], r["mining"]): r for r in rows}
    for mining in ("batch_hard", "semi_hard"):
        assert by[("metricloss", mining)]["median_s"] > 0 and by[("metricloss", mining)]["peak_extra_mib"] >= -1
    for peer in peers.PEERS:
        r = by[(peer, "batch_hard")]
        if peer in INSTALLED:
            assert "median_s" in r, r
            assert r["agree"]["value_rel"] < 1e-5, r["agree"]
        else:
            assert r["error"].startswith("not installed"), r
            assert f"{peers.NAMES[peer]}: not installed" in md
    assert by[("oml", "semi_hard")]["error"] in ("n/a",) or by[("oml", "semi_hard")]["error"].startswith("not inst")


@pytest.mark.parametrize("peer,mining", MATCHED, ids=[f"{p}-{m}" for p, m in MATCHED])
def test_peer_matches_metricloss(peer, mining):
    if peer not in INSTALLED:
        pytest.skip(f"{peer} not installed: {peers.peer_status(peer)}")
    a = peers.agreement(peer, mining, 64, d=32)
    assert a["grad_finite"]
    # the peer against the same function in fp64 (metricloss's chunked path run in fp64)
    assert a["peer_fp64_rel"] < 1e-5, a
    if (peer, mining) == ("st", "semi_hard"):
        # metricloss's fp32 semi-hard treats d_an within tie_rtol of d_ap as tied (not farther); ST's `>` is
        # strict, so on untied random inputs the two may pick different negatives: values are not compared
        return
    assert a["value_rel"] < 1e-5 and a["grad_rel"] < 1e-4, a


@pytest.mark.parametrize("kind", ["onehot", "dup"])
def test_tied_inputs_every_installed_library_matches_fp64(kind):
    import torch

    from metricloss import reference

    emb0, labels = peers.tie_inputs(kind)
    for lib in ["metricloss"] + INSTALLED:
        for mining in peers.MININGS:
            red = "mean" if lib == "metricloss" else peers.MATCH.get((lib, mining))
            if red is None:
                continue
            ref = float(reference.triplet_loss(emb0.double(), labels, margin=peers.MARGIN, mining=mining,
                                               reduction=red))
            emb = emb0.clone().requires_grad_()
            loss = peers.build_loss(lib, mining, red)(emb, labels)
            loss.backward()
            assert torch.isfinite(emb.grad).all(), (lib, mining)
            # PML's cdist (Gram expansion for > 25 rows) leaves ~1e-4 on duplicated rows' zero distances
            tol = 1e-3 if (lib == "pml" and kind == "dup") else 1e-5
            assert abs(float(loss.detach()) - ref) <= tol * abs(ref), (lib, mining, float(loss.detach()), ref)
