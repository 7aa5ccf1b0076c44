"""Measurement profiles of PROTOCOL.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Profile:
    name: str
    calib_dataset: str
    nsamples: int
    calib_seqlen: int
    seed: int
    eval_datasets: tuple[str, ...]
    eval_seqlen: int
    eval_limit: int | None  # windows; None = the whole test split
    meant_for: str
    # Method knobs this profile sets unless the run sets them: {method: {knob: value}}.
    method_defaults: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    # OmniQuant's reference 20 epochs take ~60 min on 2 cores (~5.9 s per block per epoch for
    # SmolLM2-135M); 2 epochs keep it, and awq+omniquant, under 10 minutes.
    "cpu": Profile("cpu", "wiki", 32, 512, 0, ("wiki",), 2048, 16, "a 2-core machine (default offline)",
                   {"omniquant": {"epochs": 2}}),
    "paper": Profile("paper", "wiki", 128, 2048, 0, ("wiki",), 2048, None, "a GPU, real checkpoints"),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]
