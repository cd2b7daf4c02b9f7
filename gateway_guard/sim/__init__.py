"""A GPU-like OpenAI-compatible upstream for demos, tests and load tests (``python -m gateway_guard.sim``)."""

from gateway_guard.sim.model import Gpu, GpuStats, Mode, SimConfig
from gateway_guard.sim.server import SimApp, build_sim_app

__all__ = ["Gpu", "GpuStats", "Mode", "SimApp", "SimConfig", "build_sim_app"]
