import sys, onnx
from onnx import helper, numpy_helper as nh, TensorProto
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
m = onnx.load(src)
g = m.graph
inits = {t.name: t for t in g.initializer}
producers = {o: n for n in g.node for o in n.output}
consumers = {}
for n in g.node:
    for i in n.input:
        consumers.setdefault(i, []).append(n)
remove = set()
new_nodes_before = {}  # node id -> list of replacement nodes
new_inits = []
for n in list(g.node):
    if n.op_type == 'Mul' and n.input[1].endswith('_scale') and n.input[0].endswith('_f'):
        cast = producers[n.input[0]]
        q = cast.input[0]
        scale = nh.to_array(inits[n.input[1]])
        for c in consumers[n.output[0]]:
            if c.op_type == 'MatMul':
                assert c.input[1] == n.output[0]
                sname = n.input[1] + '_1d'
                zname = q + '_zp'
                new_inits.append(nh.from_array(scale.reshape(-1).astype(np.float32), sname))
                new_inits.append(nh.from_array(np.zeros(scale.size, dtype=np.int8), zname))
                dq = helper.make_node('DynamicQuantizeMatMul', [c.input[0], q, sname, zname], list(c.output),
                                      name=c.name + '_dqmm', domain='com.microsoft')
                new_nodes_before[id(c)] = [dq]
                remove.add(id(c))
            elif c.op_type == 'Gather':
                assert c.input[0] == n.output[0]
                idx = c.input[1]
                gq = helper.make_node('Gather', [q, idx], [c.output[0] + '_gq'], name=c.name + '_gq', axis=0)
                cf = helper.make_node('Cast', [c.output[0] + '_gq'], [c.output[0] + '_gf'], name=c.name + '_gf', to=TensorProto.FLOAT)
                gs = helper.make_node('Gather', [n.input[1], idx], [c.output[0] + '_gs'], name=c.name + '_gs', axis=0)
                mul = helper.make_node('Mul', [c.output[0] + '_gf', c.output[0] + '_gs'], list(c.output), name=c.name + '_gm')
                new_nodes_before[id(c)] = [gq, cf, gs, mul]
                remove.add(id(c))
            else:
                raise SystemExit('unexpected consumer ' + c.op_type)
        remove.add(id(n)); remove.add(id(cast))
nodes = []
for n in g.node:
    if id(n) in new_nodes_before:
        nodes.extend(new_nodes_before[id(n)])
    if id(n) not in remove:
        nodes.append(n)
del g.node[:]
g.node.extend(nodes)
g.initializer.extend(new_inits)
# drop scale initializers now unused
used = {i for n in g.node for i in n.input}
keep = [t for t in g.initializer if t.name in used]
del g.initializer[:]
g.initializer.extend(keep)
if not any(o.domain == 'com.microsoft' for o in m.opset_import):
    m.opset_import.append(helper.make_opsetid('com.microsoft', 1))
onnx.checker.check_model(m)
onnx.save(m, dst)
