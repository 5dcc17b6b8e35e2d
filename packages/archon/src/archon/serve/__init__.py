"""`archon serve`: a rollout server speaking SGLang's native HTTP API over Archon's generation backend."""

from archon.serve.app import add_serve_arguments, load_served_model, run_serve
from archon.serve.backend import SamplerBackend, make_backend
from archon.serve.server import RolloutServer, ServedModel

__all__ = ["RolloutServer", "ServedModel", "SamplerBackend", "make_backend", "add_serve_arguments",
           "load_served_model", "run_serve"]
