"""Sharded losses equal the float64 single-device formula in value and gradients."""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from reference import sigmoid_loss_and_grads, softmax_loss_and_grads, unit_rows
from vlm_jax import losses

DEVICE_COUNTS = (1, 2, 4, 8)


def _mesh(n):
    return Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))


def _put(x, mesh):
    return jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, P("data")))


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() <= rtol * scale, (actual, expected)


IMPLS = [("all_gather", None), ("ring", None), ("tiled", None), ("tiled", 3)]
CASES = [(0, 48, 8), (1, 24, 32), (2, 40, 16)]  # b = B/N includes 3 and 5: not powers of two


def _run(kind, impl, tile, n, zi, zt, log_t, bias, dtype=jnp.float32):
    mesh = _mesh(n)
    put = lambda x: jax.device_put(jnp.asarray(x, dtype), NamedSharding(mesh, P("data")))  # noqa: E731
    if kind == "softmax":
        f = lambda a, b, lt: losses.softmax_loss(a, b, lt, impl=impl, mesh=mesh, tile=tile)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(put(zi), put(zt), jnp.float32(log_t))
    f = lambda a, b, lt, bb: losses.sigmoid_loss(a, b, lt, bb, impl=impl, mesh=mesh, tile=tile)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(put(zi), put(zt), jnp.float32(log_t), jnp.float32(bias))


def _reference(kind, zi, zt, log_t, bias):
    if kind == "softmax":
        ref, g = softmax_loss_and_grads(zi, zt, log_t)
        return ref, [g["zimg"], g["ztxt"], g["log_t"]]
    ref, g = sigmoid_loss_and_grads(zi, zt, log_t, bias)
    return ref, [g["zimg"], g["ztxt"], g["log_t"], g["bias"]]


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("impl,tile", IMPLS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sharded_loss_matches_float64_reference(kind, impl, tile, n):
    for seed, B, d in CASES:
        if tile and (B // n) % tile:
            continue
        rng = np.random.default_rng(seed)
        zi, zt = unit_rows(rng, B, d), unit_rows(rng, B, d)
        log_t, bias = (np.log(1 / 0.07), 0.0) if kind == "softmax" else (np.log(10.0), -10.0)
        if seed:  # away from the initial values too
            log_t, bias = 1.0 + seed, 1.0 - 2.0 * seed
        value, grads = _run(kind, impl, tile, n, zi, zt, log_t, bias)
        ref, ref_grads = _reference(kind, zi, zt, log_t, bias)
        assert value.dtype == jnp.float32 and value.shape == ()
        _close(value, ref)
        for got, want in zip(grads, ref_grads):
            _close(got, want)


@pytest.mark.parametrize("impl,tile", IMPLS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bfloat16_inputs_match_reference_loosely(kind, impl, tile):
    rng = np.random.default_rng(7)
    zi, zt = unit_rows(rng, 48, 64), unit_rows(rng, 48, 64)
    zi = np.asarray(jnp.asarray(zi, jnp.bfloat16), np.float64)  # the reference sees the rounded inputs
    zt = np.asarray(jnp.asarray(zt, jnp.bfloat16), np.float64)
    value, grads = _run(kind, impl, tile, 8, zi, zt, 2.0, -1.0, dtype=jnp.bfloat16)
    ref, ref_grads = _reference(kind, zi, zt, 2.0, -1.0)
    assert value.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
    _close(value, ref, rtol=1e-5)  # float32 accumulation: the value stays exact
    for got, want in zip(grads, ref_grads):
        _close(got, want, rtol=2e-2)  # gradients are rounded to bf16


def _temp_bytes(kind, impl, n, b, d=64):
    mesh = _mesh(n)
    sh = NamedSharding(mesh, P("data"))
    z = jax.ShapeDtypeStruct((b * n, d), jnp.float32, sharding=sh)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    if kind == "softmax":
        f = jax.value_and_grad(lambda a, c, lt: losses.softmax_loss(a, c, lt, impl=impl, mesh=mesh), argnums=(0, 1, 2))
        compiled = jax.jit(f).lower(z, z, s).compile()
    else:
        f = jax.value_and_grad(lambda a, c, lt, bb: losses.sigmoid_loss(a, c, lt, bb, impl=impl, mesh=mesh), argnums=(0, 1, 2, 3))
        compiled = jax.jit(f).lower(z, z, s, s).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_memory_of_ring_and_tiled_does_not_grow_with_devices(kind):
    """At fixed per-device b, all_gather's temporaries grow with N·b; ring/tiled's do not."""
    b = 256
    temps = {impl: [_temp_bytes(kind, impl, n, b) for n in (1, 2, 4, 8)] for impl in ("all_gather", "ring", "tiled")}
    block = b * b * 4  # one float32 (b × b) block of logits
    for impl in ("ring", "tiled"):
        # Bounded by a few blocks whatever N (N = 2 runs its single ring step
        # unrolled, which XLA schedules with two live blocks), and flat at scale.
        assert max(temps[impl]) <= 8 * block, (impl, temps)
        assert temps[impl][3] <= 1.1 * temps[impl][2], (impl, temps)
    ag = temps["all_gather"]
    assert ag[3] > 4 * ag[0], temps  # the b×B logits: 8× at N = 8
    assert ag[3] > 2 * max(temps["ring"] + temps["tiled"]), temps


def test_dense_formulas_without_mesh_match_reference():
    rng = np.random.default_rng(3)
    zi, zt = unit_rows(rng, 12, 8), unit_rows(rng, 12, 8)
    v, g = jax.value_and_grad(losses.softmax_loss, argnums=(0, 1, 2))(jnp.float32(zi), jnp.float32(zt), jnp.float32(2.0))
    ref, rg = softmax_loss_and_grads(zi, zt, 2.0)
    _close(v, ref)
    _close(g[2], rg["log_t"])
    v, g = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))(
        jnp.float32(zi), jnp.float32(zt), jnp.float32(2.0), jnp.float32(-1.0))
    ref, rg = sigmoid_loss_and_grads(zi, zt, 2.0, -1.0)
    _close(v, ref)
    _close(g[3], rg["bias"])


def test_indivisible_batch_and_unknown_impl_are_clear_errors():
    mesh = _mesh(8)
    z = jnp.ones((12, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"B=12 is not divisible by the 8 devices"):
        losses.softmax_loss(z, z, jnp.float32(1.0), mesh=mesh)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        losses.sigmoid_loss(z, z, jnp.float32(1.0), jnp.float32(0.0), impl="ringg")
    with pytest.raises(ValueError, match=r"tile=5 must be a positive divisor"):
        losses.softmax_loss(jnp.ones((16, 4)), jnp.ones((16, 4)), jnp.float32(1.0), impl="tiled", mesh=mesh, tile=5)
    with pytest.raises(ValueError, match=r"shape \(B, d\)"):
        losses.softmax_loss(z, z[:, :2], jnp.float32(1.0))


# --------------------------------------------------------------------------- UniCL, SLIP, FILIP

from reference import filip_loss_and_grads, image_infonce_loss_and_grads, unicl_loss_and_grads  # noqa: E402

INFONCE_IMPLS = [("all_gather", None), ("ring", None), ("tiled", 2)]


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("impl,tile", INFONCE_IMPLS)
def test_unicl_matches_reference(impl, tile, n):
    for seed, B in ((0, 16), (1, 24)):
        if tile and (B // n) % tile:
            continue  # B = 16 still runs at this N
        rng = np.random.default_rng(seed)
        zi, zt = unit_rows(rng, B, 8), unit_rows(rng, B, 8)
        y = rng.integers(0, 5, B)  # repeated labels: several positives per row
        mesh = _mesh(n)
        f = lambda a, b, lab, lt: losses.unicl_loss(a, b, lab, lt, impl=impl, mesh=mesh, tile=tile)  # noqa: E731
        value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3)))(
            _put(zi, mesh), _put(zt, mesh), jnp.asarray(y, jnp.int32), jnp.float32(2.0))
        ref, g = unicl_loss_and_grads(zi, zt, y, 2.0)
        _close(value, ref)
        for got, key in zip(grads, ("zimg", "ztxt", "log_t")):
            _close(got, g[key])


def test_unicl_with_distinct_labels_is_clip():
    rng = np.random.default_rng(5)
    zi, zt = unit_rows(rng, 16, 8), unit_rows(rng, 16, 8)
    mesh = _mesh(4)
    a = losses.unicl_loss(_put(zi, mesh), _put(zt, mesh), jnp.arange(16), jnp.float32(1.5), mesh=mesh, impl="ring")
    b = losses.softmax_loss(_put(zi, mesh), _put(zt, mesh), jnp.float32(1.5), mesh=mesh)
    _close(a, b)


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("impl,tile", INFONCE_IMPLS + [("tiled", 3)])
def test_image_infonce_matches_reference(impl, tile, n):
    B = 24  # 2b = 48, 24, 12, 6 anchors per device: tiles 2 and 3 divide all of them
    rng = np.random.default_rng(n)
    z1, z2 = unit_rows(rng, B, 16), unit_rows(rng, B, 16)
    mesh = _mesh(n)
    f = lambda a, b, lt: losses.image_infonce_loss(a, b, lt, impl=impl, mesh=mesh, tile=tile)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(_put(z1, mesh), _put(z2, mesh), jnp.float32(np.log(10.0)))
    ref, g = image_infonce_loss_and_grads(z1, z2, np.log(10.0))
    _close(value, ref)
    for got, key in zip(grads, ("z1", "z2", "log_t")):
        _close(got, g[key])


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("impl,tile", INFONCE_IMPLS)
def test_filip_matches_reference(impl, tile, n):
    B, d = 16, 8
    rng = np.random.default_rng(10 + n)
    img = rng.normal(size=(B, 3, d)) / np.sqrt(d)
    txt = rng.normal(size=(B, 5, d)) / np.sqrt(d)
    mask = (rng.random((B, 5)) < 0.6).astype(np.float32)
    mask[:, 0] = 1.0  # every caption has at least one token
    mesh = _mesh(n)
    f = lambda a, b, m, lt: losses.filip_loss(a, b, m, lt, impl=impl, mesh=mesh, tile=tile)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3)))(
        _put(img, mesh), _put(txt, mesh), _put(mask, mesh), jnp.float32(1.0))
    ref, g = filip_loss_and_grads(img, txt, mask, 1.0)
    _close(value, ref)
    for got, key in zip(grads, ("img", "txt", "log_t")):
        _close(got, g[key])


@pytest.mark.parametrize("impl,tile", INFONCE_IMPLS)
def test_objectives_accept_bfloat16(impl, tile):
    rng = np.random.default_rng(9)
    mesh = _mesh(8)
    z1 = jnp.asarray(unit_rows(rng, 32, 16), jnp.bfloat16)
    z2 = jnp.asarray(unit_rows(rng, 32, 16), jnp.bfloat16)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    value, (g1, _) = jax.value_and_grad(
        lambda a, b: losses.image_infonce_loss(a, b, jnp.float32(2.0), impl=impl, mesh=mesh, tile=tile), argnums=(0, 1)
    )(put(z1), put(z2))
    ref, g = image_infonce_loss_and_grads(np.asarray(z1, np.float64), np.asarray(z2, np.float64), 2.0)
    assert value.dtype == jnp.float32 and g1.dtype == jnp.bfloat16
    _close(value, ref)
    _close(g1, g["z1"], rtol=2e-2)


def test_objective_errors_are_clear():
    mesh = _mesh(8)
    z = jnp.ones((12, 4))
    with pytest.raises(ValueError, match="B=12 is not divisible by the 8 devices"):
        losses.unicl_loss(z, z, jnp.zeros(12, jnp.int32), jnp.float32(1.0), mesh=mesh)
    with pytest.raises(ValueError, match="tile=5 must be a positive divisor"):
        losses.image_infonce_loss(jnp.ones((16, 4)), jnp.ones((16, 4)), jnp.float32(1.0), mesh=mesh, impl="tiled", tile=5)
    with pytest.raises(ValueError, match="filip_loss: expected"):
        losses.filip_loss(z, z, jnp.ones((12, 3)), jnp.float32(1.0))
    with pytest.raises(ValueError, match="unicl_loss: axis \\['model'\\] not in mesh axes"):
        losses.unicl_loss(z, z, jnp.zeros(12, jnp.int32), jnp.float32(1.0), mesh=mesh, axis="model")
    with pytest.raises(ValueError, match="sigmoid_loss: tile=2 applies to impl='tiled' only"):
        losses.sigmoid_loss(z, z, jnp.float32(1.0), jnp.float32(0.0), impl="ring", tile=2)


def test_every_loss_names_itself_and_the_one_impl_tuple():
    assert losses.IMPLS == ("all_gather", "ring", "tiled")
    z, s = jnp.ones((4, 2)), jnp.float32(1.0)
    calls = {
        "softmax_loss": lambda **kw: losses.softmax_loss(z, z, s, **kw),
        "sigmoid_loss": lambda **kw: losses.sigmoid_loss(z, z, s, s, **kw),
        "unicl_loss": lambda **kw: losses.unicl_loss(z, z, jnp.zeros(4, jnp.int32), s, **kw),
        "image_infonce_loss": lambda **kw: losses.image_infonce_loss(z, z, s, **kw),
        "filip_loss": lambda **kw: losses.filip_loss(z[:, None], z[:, None], jnp.ones((4, 1)), s, **kw),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name}: impl must be one of \\('all_gather', 'ring', 'tiled'\\)"):
            call(impl="gather")


# --------------------------------------------------------------------------- the package's structure

LOSSES_DIR = os.path.dirname(os.path.abspath(losses.__file__))


def _losses_imports() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the losses modules it imports, the private names it takes
    from another), for every module of vlm_jax/losses by its file stem."""
    stems = {f[:-3] for f in os.listdir(LOSSES_DIR) if f.endswith(".py")}
    pkg = "vlm_jax.losses"
    edges: dict[str, set[str]] = {m: set() for m in stems}
    private: list[str] = []
    for mod in sorted(stems):
        tree = ast.parse(open(os.path.join(LOSSES_DIR, mod + ".py")).read())
        module_aliases = {}  # local name -> the losses module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(pkg + "."):
                        edges[mod].add(a.name.split(".")[2])
                        module_aliases[a.asname or a.name] = a.name.split(".")[2]
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:  # relative to this package
                base = pkg + (f".{base}" if base else "")
            if base != pkg and not base.startswith(pkg + "."):
                continue
            source = base[len(pkg) + 1:] or "__init__"
            for a in node.names:
                if base == pkg and a.name in stems:  # ``from vlm_jax.losses import ring``
                    edges[mod].add(a.name)
                    module_aliases[a.asname or a.name] = a.name
                else:
                    edges[mod].add(source)
                    if a.name.startswith("_"):
                        private.append(f"{mod} imports {a.name} from {source}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")):
                private.append(f"{mod} uses {node.value.id}.{node.attr}")
        edges[mod].discard(mod)
    return edges, private


def test_losses_imports_run_downwards_and_take_no_private_names():
    edges, private = _losses_imports()
    assert not private, private
    # The parse sees the layering (so the checks below are not vacuous).
    assert edges["ring"] == set(), edges
    assert {"ring", "infonce", "sigmoid"} <= edges["api"] and "api" in edges["__init__"], edges
    remaining = {m: set(deps) for m, deps in edges.items()}
    while remaining:  # peel off modules that import nothing left; a cycle leaves none to peel
        leaves = [m for m, deps in remaining.items() if not deps & remaining.keys()]
        assert leaves, f"import cycle among {sorted(remaining)}: {remaining}"
        for m in leaves:
            del remaining[m]


# --------------------------------------------------------------------------- NegCLIP (hard-negative captions)

from reference import negclip_loss_and_grads  # noqa: E402


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("impl,tile", INFONCE_IMPLS)
def test_negclip_matches_reference(impl, tile, n):
    rng = np.random.default_rng(n)
    B = 16
    zi, zt, zn = unit_rows(rng, B, 8), unit_rows(rng, B, 8), unit_rows(rng, B, 8)
    valid = rng.random(B) < 0.7  # some pairs have no negative
    mesh = _mesh(n)
    f = lambda a, b, c, v, lt: losses.negclip_loss(a, b, c, v, lt, impl=impl, mesh=mesh, tile=tile)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 4)))(
        _put(zi, mesh), _put(zt, mesh), _put(zn, mesh), jnp.asarray(valid), jnp.float32(2.0))
    ref, g = negclip_loss_and_grads(zi, zt, zn, valid, 2.0)
    _close(value, ref)
    for got, key in zip(grads, ("zimg", "ztxt", "znegative", "log_t")):
        _close(got, g[key])


def test_negclip_without_valid_negatives_is_clip_and_a_negative_raises_the_loss():
    rng = np.random.default_rng(3)
    zi, zt, zn = unit_rows(rng, 16, 8), unit_rows(rng, 16, 8), unit_rows(rng, 16, 8)
    mesh = _mesh(4)
    args = (_put(zi, mesh), _put(zt, mesh), _put(zn, mesh))
    none = losses.negclip_loss(*args, jnp.zeros(16, bool), jnp.float32(1.5), mesh=mesh, impl="ring")
    clip = losses.softmax_loss(args[0], args[1], jnp.float32(1.5), mesh=mesh)
    _close(none, clip)
    one = losses.negclip_loss(*args, jnp.arange(16) == 5, jnp.float32(1.5), mesh=mesh, impl="ring")
    assert float(one) > float(clip)
