"""Measurement profiles of PROTOCOL.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "cpu": Profile("cpu", "wiki", 32, 512, 0, ("wiki",), 2048, 16, "a 2-core machine (default offline)"),
    "paper": Profile("paper", "wiki", 128, 2048, 0, ("wiki",), 2048, None, "a GPU, real checkpoints"),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]
