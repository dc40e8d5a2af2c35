"""Training graphs (forward + backward through AOTAutograd) give eager's gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import yirage_compile

import yirage_dynamo


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.fc1 = torch.nn.Linear(16, 64)
        self.fc2 = torch.nn.Linear(64, 16)

    def forward(self, x):
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


def _grads(model, x, target):
    model.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_loss_backward_gradients_match_eager():
    torch.manual_seed(0)
    model = Block()
    x, target = torch.randn(4, 5, 16), torch.randn(4, 5, 16)
    loss_e, grads_e = _grads(model, x, target)
    loss_c, grads_c = _grads(yirage_compile(model), x, target)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)
    kinds = {r.kind for r in yirage_dynamo.reports()}
    assert {"forward", "backward"} <= kinds


def test_training_graphs_do_not_freeze_parameters():
    torch.manual_seed(0)
    model = Block()
    compiled = yirage_compile(model)
    x = torch.randn(2, 16)
    compiled(x).sum().backward()
    fw = [r for r in yirage_dynamo.reports() if r.kind == "forward"][-1]
    assert "freeze_parameters" not in [p.name for p in fw.passes]
    # A weight update between steps must be seen by the compiled forward.
    with torch.no_grad():
        model.fc2.bias.add_(1.0)
    torch.testing.assert_close(compiled(x), model(x))
