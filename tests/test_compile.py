"""torch.compile of a training step that calls opt.step(loss=loss)."""

from __future__ import annotations

import pytest
import torch

from alig_fused import FusedALIG


def make(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = FusedALIG(model.parameters(), lr=0.1, momentum=0.9, max_norm=5.0, backend=backend)
    return model, opt


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_compiled_step_matches_eager(name):
    from conftest import require_backend

    require_backend(name, torch.device("cpu"))
    torch._dynamo.reset()
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    eager_model, eager_opt = make(name)
    model, opt = make(name)

    # fullgraph=True: the optimizer step itself traces without a graph break
    @torch.compile(fullgraph=True)
    def compiled_opt_step(loss):
        opt.step(loss=loss)

    for _ in range(3):
        for m, o, step in ((eager_model, eager_opt, None), (model, opt, compiled_opt_step)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            if step is None:
                o.step(loss=loss)
            else:
                step(loss.detach())
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert float(opt.param_groups[0]["step_size"]) > 0
