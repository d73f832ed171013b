"""hpcps info: versions, MPI library, CUDA-awareness and the GPU transport path, GPUs, HDF5
(and the role layout under mpirun)."""

import importlib.util
import json
import os
import platform

import h5py
import mpi4py
import numpy

from hpcps import __version__
from hpcps.config import load_config
from hpcps.gpu.transport import describe_path
from hpcps.ps.roles import build_roles
from hpcps.runtime.mpi import agree_on_errors, library_info, world

NAME = "info"
HELP = "print versions, the MPI library and its features, GPUs, HDF5 settings and the role layout"
EXAMPLE = "mpirun -n 4 python -m mpi4py -m hpcps info ps.servers=2"


def add_arguments(parser):
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides used to show the role layout (e.g. ps.servers=2)")
    parser.add_argument("--json", action="store_true", help="one JSON object")


def gather_info(overrides=()) -> dict:
    comm = world()
    info = {"hpcps": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "mpi4py": mpi4py.__version__}
    info.update({f"mpi_{k}": v for k, v in library_info().items()})
    info["hdf5_file_locking"] = os.environ.get("HDF5_USE_FILE_LOCKING", "default (on)")
    info["gpus"] = _gpus()
    cfg = load_config(None, overrides)
    info["gpu_transport"] = _transport(cfg, info["mpi_cuda_aware"])
    roles = build_roles(cfg, comm)
    info["ranks"] = comm.Get_size()
    info["roles"] = roles.describe()
    info["servers"] = roles.servers
    info["hosts"] = sorted(set(roles.hosts)) if roles.hosts else [platform.node()]
    return info


def _transport(cfg, cuda_aware: str) -> str:
    """How a GPU worker's buffers would reach MPI with this config (device = gpu)."""
    plain = cfg.ps.compression == "none"
    if cfg.device != "gpu":
        return f"host (device = cpu); with device = gpu: {describe_path('gpu', cuda_aware, plain)}"
    return describe_path("gpu", cuda_aware, plain)


def _gpus() -> str:
    """Visible GPUs without importing CuPy unless it is installed."""
    if importlib.util.find_spec("cupy") is None:
        return "none (CuPy not installed)"
    try:
        import cupy  # optional (the gpu extra), and only once we know it is installed
        n = cupy.cuda.runtime.getDeviceCount()
        names = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(n)]
        return f"{n}: {', '.join(names)}" if n else "none visible"
    except Exception as err:  # driver missing or broken
        return f"none usable ({type(err).__name__})"


def run(args):

    comm = world()
    info = agree_on_errors(comm, lambda: gather_info(args.overrides))
    if comm.Get_rank() != 0:
        return 0
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
