"""The benchmarks' numpy local SGD equals the torch steps the sites run (FedProx + SCAFFOLD)."""

import numpy as np
import torch
from torch import nn

from benchmarks.logreg_federation import LocalSetup, logreg_sgd
from fl_components.data.types import Split
from fl_components.parameters import get_parameters
from fl_components.site.objective import proximal_penalty, scaffold_correct_gradients


def test_numpy_sgd_matches_torch_with_proximal_term_and_scaffold_correction() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 1, 1, 0], dtype=np.int64)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    start = get_parameters(model)
    c = [rng.normal(size=a.shape).astype(np.float32) for a in start]
    c_i = [rng.normal(size=a.shape).astype(np.float32) for a in start]

    # torch: three full-batch SGD steps from θ_t, loss + (μ/2)‖θ − θ_t‖², g ← g − c_i + c
    anchor = [torch.from_numpy(a.copy()) for a in start]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        (loss + proximal_penalty(model, anchor, 0.5)).backward()
        scaffold_correct_gradients(model, c, c_i)
        optimizer.step()
    expected = get_parameters(model)

    correction = [a - b for a, b in zip(c, c_i, strict=True)]
    local, steps, _ = logreg_sgd(
        start,
        Split(x, y),
        setup=LocalSetup(lr=0.1, batch_size=4, epochs=3),
        seed=0,
        mu=0.5,
        correction=correction,
    )
    assert steps == 3
    for a, b in zip(local, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
