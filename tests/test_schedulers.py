"""numpy schedulers vs diffusers 0.42, every step, on the same fake model outputs.

Each case runs both loops side by side: initial latents from the same seeded CPU
generator (TorchCPUGenerator vs torch), a fixed sequence of random "model outputs"
(including PNDM's repeated timestep), diffusers' step with generator=torch CPU
generator, ours with TorchCPUGenerator. Checked: timesteps equal, init_noise_sigma equal,
and after every call max|ours - diffusers| / max|diffusers| <= 1e-5 for the UNet input
and the new sample. The model-output buffer is reused across calls, as the pipeline does,
so a scheduler that kept a reference to it would fail.

Measured max relative error on this machine (v1-4 config, steps 1/2/10/50): pndm 3.7e-7,
ddim 8.5e-7, euler 3.6e-7, euler_a 4.1e-7, lms 8.4e-7, dpmpp_2m 9.5e-7, dpmpp_2m_karras
1.2e-6; over the config variants and other step
counts (3..250) at most 3.4e-6; PNDM with the Runge-Kutta warm-up 7.6e-7.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from runtime.rng import TorchCPUGenerator
from runtime.schedulers import (
    CONFIG_OVERRIDES,
    DIFFUSERS_CLASS,
    SCHEDULERS,
    make_schedule,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

V14 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
       "trained_betas": None, "clip_sample": False}
SHAPE = (2, 4, 8, 8)
RTOL = 1e-5


def _needs_scipy(name: str) -> None:
    if name == "lms":  # diffusers' LMSDiscreteScheduler integrates with scipy
        pytest.importorskip("scipy")


def _rel_err(ours: np.ndarray, ref) -> float:
    ref = ref.numpy() if hasattr(ref, "numpy") else np.asarray(ref)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def run_both(name: str, config: dict, steps: int, seed: int = 0) -> float:
    """Run ours and diffusers' loop side by side; return the max relative error seen."""
    _needs_scipy(name)
    cls = getattr(diffusers, DIFFUSERS_CLASS[name])
    ref = cls.from_config({**config, **CONFIG_OVERRIDES[name]})
    ref.set_timesteps(steps)
    ours = make_schedule(name, config, steps)
    ref_t = ref.timesteps.numpy()
    if np.array_equal(ref_t, np.round(ref_t)):  # integer timesteps: exactly equal
        np.testing.assert_array_equal(ours.timesteps, ref_t.astype(np.float32))
    else:  # Karras sigmas -> fractional t: torch's float32 sqrt is not correctly rounded on
        # every build, so sigma tables (and t) can differ from ours by an ulp
        np.testing.assert_allclose(ours.timesteps, ref_t, rtol=1e-6, atol=0)
    assert ours.timesteps.dtype == np.float32
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    gen, rng = torch.Generator("cpu").manual_seed(seed), TorchCPUGenerator(seed)
    x_ref = torch.randn(SHAPE, generator=gen) * ref.init_noise_sigma
    x = rng.randn(SHAPE) * np.float32(ours.init_noise_sigma)
    outputs = np.random.default_rng(seed + 1)
    buffer = np.empty(SHAPE, np.float32)  # reused every call, like the pipeline's guided noise
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    step_kwargs = {"generator": gen} if takes_generator else {}
    state = ours.new_state(SHAPE, rng)  # after the initial draw, as the pipeline does
    unet_input = np.empty(SHAPE, np.float32)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        inp_ref = ref.scale_model_input(x_ref, t)
        inp = ours.scale_model_input(x, i, unet_input)
        worst = max(worst, _rel_err(np.asarray(inp, np.float32), inp_ref))
        buffer[...] = outputs.standard_normal(SHAPE, dtype=np.float32)
        x_ref = ref.step(torch.from_numpy(buffer.copy()), t, x_ref, **step_kwargs).prev_sample
        x = ours.step(state, i, buffer, x, rng, out=x)  # in place, as the pipeline does
        err = _rel_err(x, x_ref)
        assert err <= RTOL, f"{name} steps={steps} call {i} (t={t}): rel err {err:.2e}"
        worst = max(worst, err)
    assert len(ours.timesteps) == len(ref_t)
    return worst


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers_v14(name, steps):
    run_both(name, V14, steps)


def test_pndm_repeats_second_timestep():
    s = make_schedule("pndm", V14, 50)
    assert len(s.timesteps) == 51 and s.timesteps[1] == s.timesteps[2] == 961
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1


@pytest.mark.parametrize("steps", [4, 5, 10, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_runge_kutta_warmup(steps, prediction_type):
    run_both("pndm", {**V14, "skip_prk_steps": False, "prediction_type": prediction_type}, steps)


VARIANTS = [
    ({"prediction_type": "v_prediction"}, SCHEDULERS),
    ({"timestep_spacing": "linspace"}, SCHEDULERS),
    ({"timestep_spacing": "leading"}, SCHEDULERS),
    ({"timestep_spacing": "trailing"}, SCHEDULERS),
    ({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, SCHEDULERS),
    ({"prediction_type": "sample"}, ("ddim", "euler", "lms", "dpmpp_2m")),
    ({"set_alpha_to_one": True}, ("pndm", "ddim")),
    ({"steps_offset": 0}, ("pndm", "ddim", "euler")),
    ({"clip_sample": True}, ("ddim",)),
    ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, SCHEDULERS),
    ({"beta_schedule": "squaredcos_cap_v2"}, ("pndm", "ddim", "euler", "dpmpp_2m")),
    ({"use_karras_sigmas": True}, ("euler", "lms", "dpmpp_2m")),
    ({"final_sigmas_type": "sigma_min"}, ("euler", "dpmpp_2m", "dpmpp_2m_karras")),
    ({"solver_type": "heun"}, ("dpmpp_2m", "dpmpp_2m_karras")),
    ({"lower_order_final": False, "final_sigmas_type": "sigma_min"}, ("dpmpp_2m",)),
    ({"solver_order": 1}, ("dpmpp_2m",)),
]


@pytest.mark.parametrize("steps", [3, 20])
@pytest.mark.parametrize(("overrides", "names"), VARIANTS,
                         ids=["-".join(f"{k}={v}" for k, v in o.items()) for o, _ in VARIANTS])
def test_config_variants(overrides, names, steps):
    for name in names:
        run_both(name, {**V14, **overrides}, steps, seed=3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_schedule("heun", V14, 10)
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match="steps"):
            make_schedule("pndm", V14, steps)
    with pytest.raises(ValueError, match="skip_prk_steps"):  # diffusers fails there too
        make_schedule("pndm", {**V14, "skip_prk_steps": False}, 3)
    with pytest.raises(ValueError, match="prediction_type"):  # diffusers: NotImplementedError
        make_schedule("euler_a", {**V14, "prediction_type": "sample"}, 10)
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_schedule("euler", {**V14, "timestep_spacing": "cosine"}, 10)


def test_tables_are_frozen():
    s = make_schedule("euler", V14, 10)
    with pytest.raises(ValueError):
        s.timesteps[0] = 0
    with pytest.raises(AttributeError):
        s.init_noise_sigma = 2.0
