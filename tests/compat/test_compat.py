"""The MindPet 1.0.4 compatibility contract: import paths, the `tk` name, and the blog's Wukong-Huahua usage."""
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor
from mindspore.train import Model
from mindspore.train.callback import CheckpointConfig
import mindspore.dataset as ds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tk_is_the_same_objects():
    import mindpet
    import tk
    from tk.delta import LoRADense as TkLoRA
    from tk.delta.lora import LoRADense as TkLoRA2
    from tk.graph import freeze_delta as tk_freeze, TrainableParamsCheckPoint as TkCkpt
    from tk.graph.freeze_utils import freeze_modules as tk_fm
    from tk.graph.ckpt_util import TrainableParamsCheckPoint as TkCkpt2
    from mindpet.delta import LoRADense
    from mindpet.graph import freeze_delta, freeze_modules, TrainableParamsCheckPoint
    assert TkLoRA is TkLoRA2 is LoRADense
    assert tk_freeze is freeze_delta and tk_fm is freeze_modules
    assert TkCkpt is TkCkpt2 is TrainableParamsCheckPoint
    assert tk.delta is mindpet.delta and tk.graph is mindpet.graph


def test_constants_and_exceptions_contract():
    from mindpet.utils.constants import DEFAULT_FLAGS, DEFAULT_MODES
    from mindpet.utils import exceptions
    assert DEFAULT_FLAGS & os.O_CREAT and DEFAULT_MODES == stat.S_IRUSR | stat.S_IWUSR
    for name in ['ModelConfigFreezeInfoError', 'ReadYamlFileError', 'LinkPathError', 'AbsolutePathError',
                 'CheckpointError']:
        assert issubclass(getattr(exceptions, name), exceptions.MindPetError)
    assert str(exceptions.LinkPathError('msg')) == 'msg'


# ---- the MindPet blog's five Wukong-Huahua steps, verbatim apart from the tiny sizes -------------------------
from tk.delta import LoRADense  # noqa: E402  (step 1: import)
from tk.graph.freeze_utils import freeze_delta  # noqa: E402  (step 2)
from tk.graph.ckpt_util import TrainableParamsCheckPoint  # noqa: E402  (step 3)


class CrossAttention(nn.Cell):
    def __init__(self, query_dim, context_dim, heads=2, dim_head=4, dtype=ms.float32):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        # step 1: nn.Dense(query_dim, inner_dim, has_bias=False).to_float(dtype) becomes:
        self.to_q = LoRADense(query_dim, inner_dim, has_bias=False, lora_rank=4, lora_alpha=4).to_float(dtype)
        self.to_k = LoRADense(context_dim, inner_dim, has_bias=False, lora_rank=4, lora_alpha=4).to_float(dtype)
        self.to_v = LoRADense(context_dim, inner_dim, has_bias=False, lora_rank=4, lora_alpha=4).to_float(dtype)
        self.to_out = nn.SequentialCell(
            LoRADense(inner_dim, query_dim, lora_rank=4, lora_alpha=4).to_float(dtype))
        self.softmax = nn.Softmax(axis=-1)

    def construct(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        attn = self.softmax(ops.bmm(q, k.transpose(0, 2, 1)) * self.scale)
        return self.to_out(ops.bmm(attn, v))


class TinyDiffusionWithLoss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.attn = CrossAttention(8, 6)
        self.proj = nn.Dense(8, 8)

    def construct(self, x, context, target):
        return ((self.proj(self.attn(x, context)) - target) ** 2).mean()


def _data(seed=0):
    rng = np.random.RandomState(seed)
    return {'x': rng.randn(16, 3, 8).astype(np.float32), 'context': rng.randn(16, 5, 6).astype(np.float32),
            'target': rng.randn(16, 3, 8).astype(np.float32)}


def test_blog_five_steps_with_tk(graph_mode, tmp_path):
    net = TinyDiffusionWithLoss()
    base_ckpt = str(tmp_path / 'wukong-huahua-base.ckpt')
    ms.save_checkpoint(net, base_ckpt)
    frozen_before = {p.name: p.asnumpy().copy() for p in net.get_parameters() if 'lora' not in p.name}
    freeze_delta(net, 'lora')  # step 2
    opt = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2)
    model = Model(nn.TrainOneStepCell(net, opt))
    config_ck = CheckpointConfig(save_checkpoint_steps=4, keep_checkpoint_max=1)
    ckpt_dir = str(tmp_path / 'lora_ckpt')
    ckpt_callback = TrainableParamsCheckPoint(directory=ckpt_dir, prefix='wkhh_txt2img_lora', config=config_ck)
    dataset = ds.NumpySlicesDataset(_data(), shuffle=False).batch(4)
    model.train(2, dataset, callbacks=[ckpt_callback], dataset_sink_mode=False)  # step 3
    files = os.listdir(ckpt_dir)
    assert files == ['wkhh_txt2img_lora-2_4.ckpt']
    saved = ms.load_checkpoint(os.path.join(ckpt_dir, files[0]))
    tensors = [n for n in saved if not n.startswith('mindpet_meta_')]
    assert len(tensors) == 8 and all('mindpet_delta_lora' in n for n in tensors)
    for name, value in frozen_before.items():
        np.testing.assert_array_equal(net.parameters_dict()[name].asnumpy(), value)
    # steps 4-5: a fresh net gets the base checkpoint, then the LoRA checkpoint, with plain MindSpore calls.
    fresh = TinyDiffusionWithLoss()
    ms.load_param_into_net(fresh, ms.load_checkpoint(base_ckpt))
    ms.load_param_into_net(fresh, ms.load_checkpoint(os.path.join(ckpt_dir, files[0])))
    batch = {k: Tensor(v[:4]) for k, v in _data(1).items()}
    net.set_train(False)
    np.testing.assert_array_equal(fresh(**batch).asnumpy(), net(**batch).asnumpy())


def test_import_prints_nothing_and_no_side_effects(tmp_path):
    home = tmp_path / 'home'
    home.mkdir()
    out_dir = tmp_path / 'out'
    script = textwrap.dedent(f"""
        import os, sys
        import mindspore as ms
        before = ms.get_context('mode')
        import mindpet, tk
        import mindpet.delta, mindpet.graph
        assert ms.get_context('mode') == before, 'import changed the MindSpore context'
        from mindpet.delta import LoRADense
        from mindpet.graph import freeze_delta, save_trainable_params
        from mindspore import nn
        net = nn.SequentialCell([LoRADense(4, 4, lora_rank=2, lora_alpha=2)])
        freeze_delta(net, 'lora')
        save_trainable_params(net, {str(out_dir / 'a.ckpt')!r})
        print('DONE')
    """)
    os.chmod(home, stat.S_IRUSR | stat.S_IXUSR)
    try:
        env = dict(os.environ, HOME=str(home), PYTHONPATH=ROOT, GLOG_v='3')
        proc = subprocess.run([sys.executable, '-c', script], env=env, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=120)
    finally:
        os.chmod(home, stat.S_IRWXU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == 'DONE'
    assert os.listdir(home) == []
    assert sorted(os.listdir(tmp_path)) == ['home', 'out']
    assert os.listdir(out_dir) == ['a.ckpt']
