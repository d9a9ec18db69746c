"""A CPU-backed fake CUDA device for finding device bugs without a GPU.

Tensors "on cuda" are wrapper subclasses (device cuda:0 in their metadata) around real CPU tensors. A
TorchDispatchMode unwraps them, checks that no op mixes a fake-CUDA tensor with a real CPU tensor (except
where real CUDA allows it: copies, 0-dim CPU scalars in element-wise ops, CPU index tensors), runs the op on the
CPU and re-wraps the results. Factory calls with device=cuda are redirected to the CPU and wrapped.

Usage:
    import fakecuda; fakecuda.install()
"""
from __future__ import annotations

import collections
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten

LOG = collections.Counter()          # ops that mixed a 0-dim CPU tensor with fake CUDA ones
SITES = collections.defaultdict(set)
STRICT = os.environ.get("FAKECUDA_STRICT0D", "0") == "1"
_FAKE_GENS: dict[int, str] = {}


class FakeCuda(torch.Tensor):
    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        assert type(inner) is torch.Tensor and inner.device.type == "cpu", (type(inner), inner.device)
        r = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=CUDA, requires_grad=False)
        r.inner = inner
        return r

    def __repr__(self):
        return f"FakeCuda({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    def tolist(self):
        return self.inner.tolist()

    def numpy(self, *a, **k):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first. [fakecuda at " + _where() + "]")

    def data_ptr(self):
        return self.inner.data_ptr()

    def __float__(self):
        return float(self.inner)

    def __int__(self):
        return int(self.inner)

    def __index__(self):
        return self.inner.__index__()

    def __bool__(self):
        return bool(self.inner)

    def item(self):
        return self.inner.item()

    def __format__(self, spec):
        return self.inner.__format__(spec)

    def __getitem__(self, idx):
        return FakeCuda._wrap_result(self.inner[_unwrap_index(idx)])

    def __setitem__(self, idx, value):
        if isinstance(value, FakeCuda):
            value = value.inner
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            LOG["setitem with a CPU value tensor"] += 1
            SITES["setitem with a CPU value tensor"].add(_where())
        self.inner[_unwrap_index(idx)] = value

    def copy_(self, src, non_blocking=False):
        return torch.ops.aten.copy_(self, src, non_blocking)

    def contiguous(self, memory_format=torch.contiguous_format):
        return torch.ops.aten.clone(self, memory_format=memory_format) if not self.inner.is_contiguous(
            memory_format=memory_format) else self

    def nonzero(self, *, as_tuple=False):
        r = torch.ops.aten.nonzero(self)
        return tuple(r.unbind(1)) if as_tuple else r

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False):
        return torch.tensor(data, dtype=dtype or self.dtype, device=device or CUDA)

    def cuda(self, *a, **k):
        return self

    def __invert__(self):
        return torch.ops.aten.bitwise_not(self)

    @staticmethod
    def _wrap_result(x):
        return FakeCuda(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeCuda) else x

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # reached when the mode is not active (worker threads): same logic
        return FakeCudaMode.__torch_dispatch__(_MODE, func, types, args, kwargs)


def _unwrap_index(idx):
    def one(i):
        if isinstance(i, FakeCuda):
            return i.inner
        return i
    if isinstance(idx, tuple):
        return tuple(one(i) for i in idx)
    if isinstance(idx, list):
        return [one(i) for i in idx]
    return one(idx)


def _is_cuda_dev(d) -> bool:
    if d is None:
        return False
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


# ops that real CUDA runs with a CPU operand
_COPY_OPS = {aten._to_copy.default, aten.copy_.default, aten.copy.default, aten._copy_from.default,
             aten._copy_from_and_resize.default, aten.lift_fresh.default, aten.lift_fresh_copy.default,
             aten.detach.default}
_INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _where():
    st = traceback.extract_stack()
    frames = [f for f in st if "/studio/" in f.filename or "/tests/" in f.filename]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames[-4:]))


class FakeCudaMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        fakes = [t for t in flat if isinstance(t, FakeCuda)]
        cpus = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, FakeCuda)]
        target_cuda = _is_cuda_dev(kwargs.get("device"))
        if func.overloadpacket is aten.to:
            names = [a.name for a in func._schema.arguments]
            bound = dict(zip(names, args))
            bound.update(kwargs)
            if "other" in bound:
                o = bound.pop("other")
                bound["device"], bound["dtype"] = o.device, o.dtype
            args, kwargs = (bound.pop("self"),), bound
            src = args[0]
            dev = kwargs.get("device")
            same = (dev is None or (_is_cuda_dev(dev) == isinstance(src, FakeCuda))) and \
                kwargs.get("dtype") in (None, src.dtype) and not kwargs.get("copy", False)
            if same and len(args) == 1:
                return src
            if len(args) != 1:
                raise RuntimeError(f"[fakecuda] unhandled {func} {args}")
            kw = {k: v for k, v in kwargs.items() if k in ("dtype", "layout", "device", "pin_memory", "non_blocking",
                                                            "memory_format")}
            return self.__torch_dispatch__(aten._to_copy.default, types, (src,), kw)
        if func in (aten._to_copy.default,):
            src = args[0]
            dev = kwargs.get("device")
            inner = src.inner if isinstance(src, FakeCuda) else src
            kw = dict(kwargs)
            kw["device"] = torch.device("cpu")
            out = func(inner, **kw)
            if dev is None:
                to_cuda = isinstance(src, FakeCuda)
            else:
                to_cuda = _is_cuda_dev(dev)
            if out is inner:
                out = out.clone()
            return FakeCuda(out) if to_cuda else out
        if func in (aten._has_compatible_shallow_copy_type.default,):
            return type(args[0]) is type(args[1]) and args[0].device == args[1].device
        if func in (aten.copy_.default,):
            dst, src = args[0], args[1]
            di = dst.inner if isinstance(dst, FakeCuda) else dst
            si = src.inner if isinstance(src, FakeCuda) else src
            di.copy_(si, *args[2:], **kwargs)
            return dst
        if fakes or target_cuda:
            mixed = [t for t in cpus if t.dim() > 0]
            zero_d = [t for t in cpus if t.dim() == 0]
            if func in _INDEX_OPS:
                # CPU index tensors are allowed; the values / self must be on the device
                idx_ok = set()
                if func is aten.index.Tensor:
                    idx_ok = {id(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)}
                else:
                    idx_ok = {id(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)}
                mixed = [t for t in mixed if id(t) not in idx_ok]
                zero_d = [t for t in zero_d if id(t) not in idx_ok]
            if mixed:
                raise RuntimeError(
                    f"[fakecuda] Expected all tensors to be on the same device, but found at least two devices, "
                    f"cuda:0 and cpu! op={func} cpu shapes={[tuple(t.shape) for t in mixed]} at {_where()}")
            if zero_d:
                key = str(func)
                LOG[key] += 1
                SITES[key].add(_where())
                if STRICT:
                    raise RuntimeError(f"[fakecuda] 0-dim CPU tensor with cuda in {func} at {_where()}")
        if not fakes and not target_cuda:
            return func(*args, **kwargs)
        ids = {}

        def unwrap(x):
            if isinstance(x, FakeCuda):
                ids[id(x.inner)] = x
                return x.inner
            return x

        a2 = tree_map(unwrap, args)
        k2 = tree_map(unwrap, kwargs)
        if target_cuda:
            k2["device"] = torch.device("cpu")
        out = func(*a2, **k2)

        def wrap(x):
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeCuda):
                if id(x) in ids:
                    w = ids[id(x)]
                    if tuple(w.shape) != tuple(x.shape):
                        raise RuntimeError(f"[fakecuda] in-place resize of a wrapper in {func}")
                    return w
                return FakeCuda(x)
            return x

        return tree_map(wrap, out)


_orig_gen = torch.Generator


class _fake_generator(_orig_gen):
    def __new__(cls, device="cpu"):
        g = _orig_gen(device="cpu")
        _FAKE_GENS[id(g)] = "cuda" if _is_cuda_dev(device) else "cpu"
        _KEEP.append(g)
        return g


_KEEP = []
_MODE = None


def install():
    global _MODE
    import torch._dynamo  # noqa: F401  (imported before the patches)
    torch.cuda.is_available = lambda: True
    torch.cuda._lazy_init = lambda: None
    torch.cuda.is_initialized = lambda: True
    torch.cuda.mem_get_info = lambda device=None: (140 * 2**30, 141 * 2**30)
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.reset_peak_memory_stats = lambda device=None: None
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.get_device_name = lambda device=None: "FakeCuda"
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.Generator = _fake_generator
    _patch_random()
    _patch_ctors()
    _MODE = FakeCudaMode()
    _MODE.__enter__()


def report():
    for k, v in LOG.most_common():
        print(f"0-dim CPU + cuda: {k} x{v}")
        for s in sorted(SITES[k])[:6]:
            print("    ", s)


def patch_studio():
    import studio.pool, studio.engine, studio.parallel

    # CUDA work on the merge's worker threads: there is no stream to follow, and the dispatch mode is per thread
    def on_stream(fn, device):
        if torch.device(device).type != "cuda":
            return fn

        def run(x):
            with FakeCudaMode():
                return fn(x)

        return run

    studio.parallel._on_stream = on_stream

    # cuSOLVER's batched eigensolver (studio._cusolver): its batching runs, without streams, each batch solved by
    # torch's CPU solver (like cuSOLVER's, one matrix's result does not depend on the rest of its batch)
    import studio._cusolver as cusolver

    cusolver._lib = "fakecuda"
    cusolver._batcher = cusolver.Batcher(torch.linalg.eigh, streams=False)
    orig = studio.pool.resolve_device

    def resolve(device):
        d = orig(device)
        return torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d

    for mod in ("studio.pool", "studio.engine", "studio.evaluate"):
        import importlib
        m = importlib.import_module(mod)
        if hasattr(m, "resolve_device"):
            m.resolve_device = resolve


def _gen_check(name, gen, device):
    if gen is None:
        return
    gdev = _FAKE_GENS.get(id(gen), "cpu")
    want = "cuda" if _is_cuda_dev(device) else "cpu"
    if gdev != want:
        raise RuntimeError(f"[fakecuda] {name}: Expected a '{want}' device type for generator but found '{gdev}' "
                           f"at {_where()}")


def _patch_random():
    import functools
    for name in ("rand", "randn", "randint", "randperm", "bernoulli", "normal", "multinomial"):
        fn = getattr(torch, name)

        def make(fn, name):
            @functools.wraps(fn)
            def w(*a, generator=None, **k):
                dev = k.get("device")
                if dev is None:
                    t = next((x for x in a if isinstance(x, torch.Tensor)), None)
                    dev = t.device if t is not None else "cpu"
                _gen_check(name, generator, dev)
                return fn(*a, generator=generator, **k) if generator is not None else fn(*a, **k)
            return w
        setattr(torch, name, make(fn, name))
    for name in ("uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_",
                 "log_normal_"):
        fn = getattr(torch.Tensor, name)

        def make(fn, name):
            @functools.wraps(fn)
            def w(self, *a, generator=None, **k):
                _gen_check(name, generator, self.device)
                return fn(self, *a, generator=generator, **k)
            return w
        setattr(torch.Tensor, name, make(fn, name))


def _patch_ctors():
    import functools
    import functools as _ft
    _nz = torch.nonzero

    @_ft.wraps(_nz)
    def nonzero(x, *a, **k):
        if isinstance(x, FakeCuda):
            return x.nonzero(*a, **k)
        return _nz(x, *a, **k)
    torch.nonzero = nonzero
    for name in ("tensor", "as_tensor", "asarray"):
        fn = getattr(torch, name)

        def make(fn):
            @functools.wraps(fn)
            def w(data, *a, device=None, **k):
                if _is_cuda_dev(device):
                    out = fn(data, *a, **k)
                    return out if isinstance(out, FakeCuda) else torch.ops.aten._to_copy(out, device=CUDA)
                return fn(data, *a, device=device, **k)
            return w
        setattr(torch, name, make(fn))


def patch_optim():
    import torch.optim.optimizer as o
    o.Optimizer._accelerator_graph_capture_health_check = lambda self: None
    torch.accelerator.current_device_index = lambda: 0
