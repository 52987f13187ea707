"""The reversible family's models: RevNet and its matched ResNet agree, i-RevNet and NICE are
bijective, and the memory study writes its table and plot from one command."""

import json

import torch
import torch.nn.functional as nnf

from models.flows.irevnet import IRevNet
from models.flows.nice import NICE, bits_per_dim
from models.flows.revnet import MODES, RevNet
from models.studies import revnet_memory


def test_revnet_modes_give_the_same_gradients_and_running_stats():
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = RevNet(depth=4, width=4, stages=2, mode=mode, dropout=0.2)
        torch.manual_seed(1)
        nnf.cross_entropy(model(x), y).backward()
        results[mode] = ([p.grad for p in model.parameters()], [b.clone() for b in model.buffers()])
    for mode in ("reversible", "checkpoint"):
        for got, want in zip(results[mode][0], results["resnet"][0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Batch-norm statistics: updated once, as by the ordinary network (torch.utils.checkpoint's
    # recomputation updates them a second time, so it is not held to this).
    for got, want in zip(results["reversible"][1], results["resnet"][1], strict=True):
        torch.testing.assert_close(got, want)
    assert any(not torch.equal(a, b) for a, b in zip(results["checkpoint"][1], results["resnet"][1], strict=True))


def test_irevnet_rebuilds_its_input_from_its_features():
    torch.manual_seed(0)
    model = IRevNet(blocks=2, hidden=4).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        features = model.features(x)
        assert features.numel() == x.numel()  # bijective: nothing dropped
        assert ((model.inverse(features) - x).norm() / x.norm()).item() <= 1e-5


def test_nice_is_invertible_and_its_density_counts_the_scaling():
    torch.manual_seed(0)
    flow = NICE(blocks=2, hidden=16, layers=1)
    with torch.no_grad():
        flow.log_scale.normal_()
        x = torch.rand(4, 784)
        z, logdet = flow(x)
        assert torch.allclose(flow.inverse(z), x, atol=1e-5)
        assert torch.allclose(logdet, flow.log_scale.sum().expand(4))
        assert flow.sample(5, torch.Generator().manual_seed(0)).shape == (5, 784)
    assert abs(bits_per_dim(0.0) - 8.0) < 1e-12  # a uniform density on [0, 1]: 8 bits per 8-bit pixel


def test_memory_study_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "study"
    threads = torch.get_num_threads()
    try:
        rows = revnet_memory.main(
            [
                "--depths",
                "2",
                "4",
                "--width",
                "4",
                "--batch",
                "4",
                "--size",
                "8",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert {(r["depth"], r["mode"]) for r in rows} == {(d, m) for d in (2, 4) for m in MODES}
    assert (out / "revnet_memory.png").stat().st_size > 0
    assert "| 4 | matched ResNet |" in (out / "table.md").read_text()
    saved = {(r["depth"], r["mode"]): r["saved_bytes"] for r in json.loads((out / "results.json").read_text())["rows"]}
    # The reversible graph keeps the same bytes at any depth; the ordinary one keeps more per block.
    assert saved[(2, "reversible")] == saved[(4, "reversible")]
    assert saved[(4, "resnet")] > saved[(2, "resnet")]
