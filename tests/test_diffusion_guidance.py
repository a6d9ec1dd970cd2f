"""Classifier-free and classifier guidance formulas."""
import pytest
import torch

from diffusion import ClassifierFreeGuidance, classifier_cond_fn, create_diffusion

torch.set_num_threads(1)
NUM_CLASSES = 5


class LabelModel:
    """eps = x * (y + 1) / 10 on C channels, then v = y / num_classes on C more; records every call's batch."""

    def __init__(self, learn_sigma=True):
        self.calls, self.learn_sigma = [], learn_sigma

    def __call__(self, x, t, y=None, **kw):
        self.calls.append((x.shape[0], y.clone()))
        yy = y.to(x.dtype).reshape(-1, 1, 1, 1)
        eps = x * (yy + 1) / 10
        return torch.cat([eps, yy / NUM_CLASSES * torch.ones_like(x)], 1) if self.learn_sigma else eps


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_classifier_free_guidance_formula_one_batched_forward(learn_sigma):
    model = LabelModel(learn_sigma)
    w = 2.5
    cfg = ClassifierFreeGuidance(model, w, NUM_CLASSES)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    out = cfg(x, torch.tensor([1, 2, 3]), y=y)
    assert len(model.calls) == 1 and model.calls[0][0] == 6
    assert model.calls[0][1].tolist() == [0, 3, 4, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]  # null label = num_classes
    yy = y.double().reshape(-1, 1, 1, 1)
    eps_c, eps_u = x * (yy + 1) / 10, x * (NUM_CLASSES + 1) / 10
    torch.testing.assert_close(out[:, :2], (1 + w) * eps_c - w * eps_u)
    if learn_sigma:  # variance channels from the conditional half
        torch.testing.assert_close(out[:, 2:], (yy / NUM_CLASSES).expand_as(x))
    else:
        assert out.shape == x.shape
    assert torch.equal(ClassifierFreeGuidance(model, 0.0, NUM_CLASSES)(x, torch.tensor([1, 2, 3]), y=y),
                       model(x, None, y=y))


def test_classifier_free_guidance_in_ddpm_and_ddim_sampling():
    """The guided samplers equal the unguided ones run on the combined epsilon computed by hand."""
    D = create_diffusion(steps=8)
    y = torch.tensor([1, 2])
    model = LabelModel()
    cfg = ClassifierFreeGuidance(model, 3.0, NUM_CLASSES)
    manual = lambda x, t, y=None: torch.cat([4 * model(x, t, y=y)[:, :1] - 3 * model(x, t, y=torch.full_like(y, 5))[:, :1],
                                             model(x, t, y=y)[:, 1:]], 1)
    noise = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    for loop in ("p_sample_loop", "ddim_sample_loop"):
        a = getattr(D, loop)(cfg, noise.shape, noise=noise, model_kwargs={"y": y}, generator=torch.Generator().manual_seed(0))
        b = getattr(D, loop)(manual, noise.shape, noise=noise, model_kwargs={"y": y}, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b)


def test_classifier_guidance_ddpm_mean_shift_and_ddim_eps_shift():
    D = create_diffusion(steps=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    out = torch.cat([torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64), torch.zeros(2, 1, 3, 3, dtype=torch.float64)], 1)
    model = lambda x, t, **kw: out
    grad = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    seen = []
    cond_fn = lambda x, t, **kw: (seen.append(t.clone()), grad)[1]
    t = torch.tensor([4, 7])
    pm = D.p_mean_variance(model, x, t, clip_denoised=False)
    # DDPM: mean + Sigma * grad, same noise
    a = D.p_sample(model, x, t, clip_denoised=False, cond_fn=cond_fn, generator=torch.Generator().manual_seed(1))["sample"]
    b = D.p_sample(model, x, t, clip_denoised=False, generator=torch.Generator().manual_seed(1))["sample"]
    torch.testing.assert_close(a - b, pm["variance"] * grad)
    # DDIM: eps - sqrt(1 - abar_t) * grad, then the usual eta = 0 step
    ab = torch.tensor(D.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    abp = torch.tensor(D.alphas_cumprod_prev)[t].reshape(-1, 1, 1, 1)
    eps = out[:, :1] - torch.sqrt(1 - ab) * grad
    x0 = (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    c = D.ddim_sample(model, x, t, clip_denoised=False, cond_fn=cond_fn)["sample"]
    torch.testing.assert_close(c, torch.sqrt(abp) * x0 + torch.sqrt(1 - abp) * eps)
    # respaced: cond_fn also gets the original timesteps
    S = create_diffusion(steps=100, timestep_respacing="ddim10")
    seen.clear()
    S.ddim_sample(model, x, t, cond_fn=cond_fn)
    assert seen[0].tolist() == [40, 70]


def test_classifier_cond_fn_gradient_of_linear_classifier():
    torch.manual_seed(0)
    W = torch.randn(4, 6, dtype=torch.float64)
    classifier = lambda x, t: x.flatten(1) @ W.T
    x = torch.randn(3, 1, 2, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    with torch.no_grad():  # the sampler calls it under no_grad; it must still differentiate
        grad = classifier_cond_fn(classifier, scale=2.0)(x, torch.zeros(3, dtype=torch.long), y=y)
    p = torch.softmax(x.flatten(1) @ W.T, dim=1)
    expected = 2.0 * (W[y] - p @ W)  # d/dx log softmax_y(Wx) = W_y - sum_k p_k W_k
    torch.testing.assert_close(grad.flatten(1), expected)


def test_guidance_bad_inputs():
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        ClassifierFreeGuidance(LabelModel(), -1.0, 10)
    with pytest.raises(ValueError, match="needs class labels y"):
        ClassifierFreeGuidance(LabelModel(), 1.0, 10)(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="shape mismatch: y"):
        ClassifierFreeGuidance(LabelModel(), 1.0, 10)(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), y=torch.zeros(3, dtype=torch.long))
