"""Bad input everywhere: one table of bad calls across the public API, corrupted and foreign files, and
property-based tests of the config parser.

Every row of ``ROWS`` is a call, the exception type it must raise and message fragments that must all appear in the
message: the argument's name and, where there is one, the value received (for files: the file and what is wrong
with it). The rows cover every delta Cell constructor and ``shard()``, the freeze functions, the checkpoint
callback, base+delta loading and resuming, the configs, injection, adapter save/load and the ``mindpet`` CLI (exit
code 1 and a one-line message). ``test_table_size`` asserts the row count (207 rows).

Separate tests check that a failed load, save, freeze or merge leaves the network and the target directory exactly
as they were, and that unreadable paths (chmod 000; as root the check runs in a child without the capabilities that
bypass permissions) give one clear error each.
"""
import contextlib
import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.train.callback import CheckpointConfig
from hypothesis import given, settings, strategies as st, HealthCheck

from mindpet import LoraConfig, PetModel, cli, config_from_dict, config_from_yaml, get_pet_model
from mindpet.delta import (LoRADense, AdapterLayer, AdapterDense, LowRankAdapterLayer, LowRankAdapterDense,
                           PrefixLayer, PrefixAttention, PrefixEncoder, RDropLoss, rdrop_repeat, DoRADense, IA3Dense,
                           PromptTuningEmbedding, PSTDense, PSTSparsityScheduler, AdaLoRADense, AdaLoRAAllocator,
                           TSVDGroup, TSVDDense, TSVDAllocator)
from mindpet.graph import freeze_modules, freeze_delta, freeze_from_config, TrainableParamsCheckPoint
from mindpet.graph.ckpt_util import load_base_and_delta, resume_from_checkpoint, save_trainable_params
from mindpet.adapter_store import ADAPTER_CONFIG_NAME, adapter_weights_path, merge_into_checkpoint
from mindpet.utils.exceptions import (AdapterConfigError, CheckpointError, MakeDirError, ModelConfigFreezeInfoError,
                                      ModelConfigKeysInfoError, ModelConfigParamsInfoError, ReadYamlFileError)

from tests.nets import LoRAMLP, PlainMLP, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETPRIV = ['setpriv', '--bounding-set=-dac_override,-dac_read_search,-fowner', '--']

Row = namedtuple('Row', ['id', 'call', 'exc', 'fragments'])


class CliError(Exception):
    """The one-line stderr message of a ``mindpet`` command that exited with code 1."""


# ----- files every file/config row reads (built once) ----------------------------------------------------------
class Files:
    """Paths of good, corrupted and foreign files in one temporary directory."""

    def __init__(self, root):
        self.root = root
        j = lambda *parts: os.path.join(root, *parts)  # noqa: E731
        self.not_a_dir = _write(j('not_a_dir.txt'), b'plain text\n')
        self.a_dir = j('a_dir.ckpt')
        os.makedirs(self.a_dir)
        self.missing = j('missing.ckpt')
        self.base = j('base.ckpt')
        ms.save_checkpoint(PlainMLP(), self.base)
        net = LoRAMLP()
        freeze_delta(net, 'lora')
        self.delta = save_trainable_params(net, j('delta.ckpt'))
        other = LoRAMLP(rank=2)
        freeze_delta(other, 'lora')
        self.delta_other = save_trainable_params(other, j('delta_other.ckpt'))
        self.base_other = j('base_other.ckpt')
        ms.save_checkpoint(PlainMLP(hidden=8), self.base_other)
        data = open(self.delta, 'rb').read()
        self.delta_trunc = _write(j('delta_trunc.ckpt'), data[:len(data) // 2])
        self.delta_flip = _write(j('delta_flip.ckpt'), _flip(data, len(data) - 20))
        self.empty = _write(j('empty.ckpt'), b'')
        self.resume_dir = j('resume')
        os.makedirs(self.resume_dir)
        _write(os.path.join(self.resume_dir, 'DELTA_CKP-1_1.ckpt'), data[:len(data) // 3])

        pet = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=4))
        rng = np.random.RandomState(0)
        for param in pet.trainable_params():
            param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32)))
        self.adapter = j('adapter')
        pet.save_pretrained(self.adapter)
        weights = open(adapter_weights_path(self.adapter), 'rb').read()
        meta_text = open(os.path.join(self.adapter, ADAPTER_CONFIG_NAME), encoding='utf-8').read()
        self.adapter_flip = self._adapter_copy('adapter_flip', weights=_flip(weights, len(weights) - 10))
        self.adapter_trunc = self._adapter_copy('adapter_trunc', weights=weights[:len(weights) // 2])
        self.adapter_typo = self._adapter_copy('adapter_typo', meta=meta_text.replace('lora_rank:', 'lora_rnak:'))
        self.adapter_wrongtype = self._adapter_copy('adapter_wrongtype',
                                                    meta=meta_text.replace('lora_rank: 2', 'lora_rank: two'))
        self.adapter_badyaml = self._adapter_copy('adapter_badyaml', meta='pet: [unclosed\n')
        self.adapter_noweights = self._adapter_copy('adapter_noweights')
        os.remove(adapter_weights_path(self.adapter_noweights))
        other_pet = get_pet_model(PlainMLP(hidden=8), LoraConfig(target_modules=['fc1'], lora_rank=2))
        self.adapter_other = j('adapter_other')
        other_pet.save_pretrained(self.adapter_other)

        self.pet_typo = _write(j('pet_typo.yaml'), b'pet:\n  type: lora\n  target_modules: [fc1]\n  lora_ranks: 4\n')
        self.pet_wrongtype = _write(j('pet_wrongtype.yaml'),
                                    b'pet:\n  type: lora\n  target_modules: [fc1]\n  lora_rank: four\n')
        self.pet_dropout = _write(j('pet_dropout.yaml'),
                                  b'pet:\n  type: lora\n  target_modules: [fc1]\n  lora_dropout: "0.1"\n')
        self.pet_bad = _write(j('pet_bad.yaml'), b'pet: [unclosed\n')
        self.pet_nosection = _write(j('pet_nosection.yaml'), b'model: {}\n')
        self.pet_list = _write(j('pet_list.yaml'), b'pet: [lora, 4]\n')
        self.freeze_typo = _write(j('freeze_typo.yaml'), b'freeze:\n  includ: ["*"]\n')
        self.freeze_str = _write(j('freeze_str.yaml'), b'freeze:\n  include: "*"\n')
        self.freeze_nosection = _write(j('freeze_nosection.yaml'), b'pet: {}\n')
        self.freeze_nomatch = _write(j('freeze_nomatch.yaml'), b'freeze:\n  include: ["*zzz*"]\n')
        self.out_dir_ckpt = j('out_is_dir.ckpt')
        os.makedirs(self.out_dir_ckpt)

    def _adapter_copy(self, name, weights=None, meta=None):
        path = os.path.join(self.root, name)
        shutil.copytree(self.adapter, path)
        if weights is not None:
            _write(adapter_weights_path(path), weights)
        if meta is not None:
            _write(os.path.join(path, ADAPTER_CONFIG_NAME), meta.encode())
        return path


def _write(path, data):
    with open(path, 'wb') as handle:
        handle.write(data)
    return path


def _flip(data, index):
    data = bytearray(data)
    data[index] ^= 0xFF
    return bytes(data)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    return Files(str(tmp_path_factory.mktemp('bad_input')))


# ----- helpers used in rows -------------------------------------------------------------------------------------
def run_cli(*argv):
    """Run ``mindpet argv`` in-process; require exit code 1 and exactly one stderr line, then raise it."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    text = err.getvalue()
    assert code == 1, (code, text)
    assert text.startswith(f'mindpet {argv[0]}: error: ') and text.count('\n') == 1, text
    assert 'Traceback' not in text and out.getvalue() == ''
    raise CliError(text)


def lora(**kw):
    args = dict(in_channels=4, out_channels=4, lora_rank=2, lora_alpha=4)
    args.update(kw)
    return LoRADense(**args)


def pet(**kw):
    return get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'], lora_rank=2, **kw))


def tsvd_group(**kw):
    args = dict(in_channels=4, out_channels=4, num_layers=2, tsvd_rank=2)
    args.update(kw)
    return TSVDGroup(**args)


def lora_cfg(**kw):
    data = {'type': 'lora', 'target_modules': ['fc1']}
    data.update(kw)
    return data


F32 = np.float32
odd_logits = Tensor(np.ones((3, 2), F32))
odd_labels = Tensor(np.zeros(3, np.int32))

# Each call takes the Files; fragments must all be in str(exception).
ROWS = [
    # ----- LoRADense ------------------------------------------------------------------------------------------
    Row('lora-rank-0', lambda f: lora(lora_rank=0), ValueError, ["'lora_rank'", '0 (int)']),
    Row('lora-rank-float', lambda f: lora(lora_rank=2.0), TypeError, ["'lora_rank'", '2.0 (float)']),
    Row('lora-rank-bool', lambda f: lora(lora_rank=True), TypeError, ["'lora_rank'", 'True (bool)']),
    Row('lora-alpha-0', lambda f: lora(lora_alpha=0), ValueError, ["'lora_alpha'", '0 (int)']),
    Row('lora-alpha-str', lambda f: lora(lora_alpha='8'), TypeError, ["'lora_alpha'", "'8' (str)"]),
    Row('lora-alpha-nan', lambda f: lora(lora_alpha=math.nan), ValueError, ["'lora_alpha'", 'nan (float)']),
    Row('lora-alpha-inf', lambda f: lora(lora_alpha=math.inf), ValueError, ["'lora_alpha'", 'inf (float)']),
    Row('lora-dropout-1', lambda f: lora(lora_dropout=1.0), ValueError, ["'lora_dropout'", '1.0 (float)']),
    Row('lora-dropout-int', lambda f: lora(lora_dropout=0), TypeError, ["'lora_dropout'", '0 (int)']),
    Row('lora-in-str', lambda f: lora(in_channels='4'), TypeError, ["'in_channels'", "'4' (str)"]),
    Row('lora-out-neg', lambda f: lora(out_channels=-1), ValueError, ["'out_channels'", '-1 (int)']),
    Row('lora-param-dtype', lambda f: lora(param_init_type=ms.int32), TypeError,
        ["'param_init_type'", 'mindspore.int32']),
    Row('lora-compute-dtype-str', lambda f: lora(compute_dtype='float16'), TypeError,
        ["'compute_dtype'", "'float16' (str)"]),
    Row('lora-has-bias-str', lambda f: lora(has_bias='yes'), TypeError, ["'has_bias'", "'yes' (str)"]),
    Row('lora-activation-name', lambda f: lora(activation='relu7'), ValueError, ["'activation'", "'relu7'"]),
    Row('lora-a-init-name', lambda f: lora(lora_a_init='nope'), ValueError, ["'lora_a_init'", "'nope'"]),
    Row('lora-b-init-shape', lambda f: lora(lora_b_init=np.zeros((3, 3), F32)), ValueError,
        ["'lora_b_init'", '(4, 2)', '(3, 3)']),
    Row('lora-b-init-type', lambda f: lora(lora_b_init=[0.0]), TypeError, ["'lora_b_init'", '[0.0] (list)']),
    Row('lora-weight-init-name', lambda f: lora(weight_init='nope'), ValueError, ["'weight_init'", "'nope'"]),
    Row('lora-unknown-kwarg', lambda f: lora(foo=1), TypeError, ["'foo'"]),
    # ----- AdapterLayer / AdapterDense ------------------------------------------------------------------------
    Row('adapter-hidden-0', lambda f: AdapterLayer(0), ValueError, ["'hidden_size'", '0 (int)']),
    Row('adapter-bottleneck-float', lambda f: AdapterLayer(8, bottleneck_size=2.5), TypeError,
        ["'bottleneck_size'", '2.5 (float)']),
    Row('adapter-nonlinearity-name', lambda f: AdapterLayer(8, 4, non_linearity='nope'), ValueError,
        ["'non_linearity'", "'nope'"]),
    Row('adapter-nonlinearity-int', lambda f: AdapterLayer(8, 4, non_linearity=3), TypeError,
        ["'non_linearity'", '3 (int)']),
    Row('adapter-compute-dtype', lambda f: AdapterLayer(8, 4, compute_dtype=ms.int8), TypeError,
        ["'compute_dtype'", 'mindspore.int8']),
    Row('adapterdense-bottleneck-0', lambda f: AdapterDense(4, 8, bottleneck_size=0), ValueError,
        ["'bottleneck_size'", '0 (int)']),
    Row('adapterdense-activation', lambda f: AdapterDense(4, 8, activation='nope'), ValueError,
        ["'activation'", "'nope'"]),
    Row('adapterdense-has-bias-int', lambda f: AdapterDense(4, 8, has_bias=1), TypeError,
        ["'has_bias'", '1 (int)']),
    Row('adapterdense-weight-init', lambda f: AdapterDense(4, 8, weight_init='nope'), ValueError,
        ["'weight_init'", "'nope'"]),
    # ----- LowRankAdapterLayer / LowRankAdapterDense ------------------------------------------------------------
    Row('lra-reduction-too-big', lambda f: LowRankAdapterLayer(8, 16), ValueError,
        ["'reduction_factor'", "'hidden_size' (8)", '16']),
    Row('lra-reduction-float', lambda f: LowRankAdapterLayer(8, 2.0), TypeError,
        ["'reduction_factor'", '2.0 (float)']),
    Row('lra-low-rank-0', lambda f: LowRankAdapterLayer(8, 2, low_rank_size=0), ValueError,
        ["'low_rank_size'", '0 (int)']),
    Row('lra-w-init-int', lambda f: LowRankAdapterLayer(8, 2, low_rank_w_init=3), TypeError,
        ["'low_rank_w_init'", '3 (int)']),
    Row('lra-w-init-name', lambda f: LowRankAdapterLayer(8, 2, low_rank_w_init='nope'), ValueError,
        ["'low_rank_w_init'", "'nope'"]),
    Row('lrad-in-0', lambda f: LowRankAdapterDense(0, 8), ValueError, ["'in_channels'", '0 (int)']),
    Row('lrad-reduction', lambda f: LowRankAdapterDense(4, 8, reduction_factor=9), ValueError,
        ["'reduction_factor'", '9']),
    # ----- PrefixLayer / PrefixAttention / PrefixEncoder ----------------------------------------------------------
    Row('prefix-heads', lambda f: PrefixLayer(4, 2, 3, 8, 6), ValueError, ["'hidden_dim' (8)", "'num_heads' (3)"]),
    Row('prefix-dropout', lambda f: PrefixLayer(4, 2, 2, 8, 6, dropout_rate=1.0), ValueError,
        ["'dropout_rate'", '1.0 (float)']),
    Row('prefix-tokens-0', lambda f: PrefixLayer(0, 2, 2, 8, 6), ValueError, ["'prefix_token_num'", '0 (int)']),
    Row('prefix-batch-str', lambda f: PrefixLayer(4, '2', 2, 8, 6), TypeError, ["'batch_size'", "'2' (str)"]),
    Row('prefix-attention-prefix', lambda f: PrefixAttention(8, 2, prefix='x'), TypeError, ["'prefix'", 'str']),
    Row('prefix-attention-heads', lambda f: PrefixAttention(8, 3), ValueError, ["'hidden_size' (8)", "'num_heads'"]),
    Row('ptuning2-projection-int', lambda f: PrefixEncoder(4, 2, 2, 3, 1, 8, 0.0), TypeError,
        ["'prefix_projection'", '1 (int)']),
    Row('ptuning2-projection-dim', lambda f: PrefixEncoder(4, 2, 2, 3, True, 0, 0.0), ValueError,
        ["'projection_dim'", '0 (int)']),
    Row('ptuning2-dropout-int', lambda f: PrefixEncoder(4, 2, 2, 3, True, 8, 0), TypeError,
        ["'dropout_prob'", '0 (int)']),
    Row('ptuning2-out-perm', lambda f: PrefixEncoder(4, 2, 2, 3, True, 8, 0.0, out_perm=(0, 1, 2)), ValueError,
        ["'out_perm'", '(0, 1, 2)']),
    Row('ptuning2-parallel-config', lambda f: PrefixEncoder(4, 2, 2, 3, True, 8, 0.0, parallel_config=object()),
        TypeError, ["'parallel_config'", 'object']),
    Row('ptuning2-seq-neg', lambda f: PrefixEncoder(-1, 2, 2, 3, True, 8, 0.0), ValueError,
        ["'pre_seq_len'", '-1 (int)']),
    # ----- R-Drop ------------------------------------------------------------------------------------------------
    Row('rdrop-repeat-none', lambda f: rdrop_repeat(), ValueError, ["'rdrop_repeat'", 'at least one tensor']),
    Row('rdrop-repeat-str', lambda f: rdrop_repeat('a'), TypeError, ["'tensors[0]'", 'str']),
    Row('rdrop-repeat-list', lambda f: rdrop_repeat(np.ones(2), [1, 2]), TypeError, ["'tensors[1]'", 'list']),
    Row('rdrop-repeat-0d', lambda f: rdrop_repeat(np.array(1.0)), ValueError, ["'tensors[0]'", '0-d']),
    Row('rdrop-loss-odd-rows', lambda f: RDropLoss()(odd_logits, odd_labels), ValueError,
        ["'logits'", 'even number of rows', 'got 3']),
    Row('rdrop-shard-0', lambda f: RDropLoss().shard(0), ValueError, ["'data_parallel'", '0 (int)']),
    Row('rdrop-shard-str', lambda f: RDropLoss().shard('2'), TypeError, ["'data_parallel'", "'2' (str)"]),
    # ----- DoRA, IA3, prompt tuning ---------------------------------------------------------------------------
    Row('dora-alpha-0', lambda f: DoRADense(4, 4, 2, 0), ValueError, ["'lora_alpha'", '0 (int)']),
    Row('dora-rank-neg', lambda f: DoRADense(4, 4, -2, 1), ValueError, ["'lora_rank'", '-2 (int)']),
    Row('dora-a-init-shape', lambda f: DoRADense(4, 4, 2, 1, lora_a_init=np.zeros((4, 4), F32)), ValueError,
        ["'lora_a_init'", '(2, 4)', '(4, 4)']),
    Row('dora-unknown-kwarg', lambda f: DoRADense(4, 4, 2, 1, bias=True), TypeError, ["'bias'"]),
    Row('ia3-feedforward-str', lambda f: IA3Dense(4, 4, ia3_feedforward='no'), TypeError,
        ["'ia3_feedforward'", "'no' (str)"]),
    Row('ia3-init-shape', lambda f: IA3Dense(4, 4, ia3_init=np.ones(3, F32)), ValueError,
        ["'ia3_init'", '(4,)', '(3,)']),
    Row('ia3-init-name', lambda f: IA3Dense(4, 4, ia3_init='nope'), ValueError, ["'ia3_init'", "'nope'"]),
    Row('prompt-tokens-0', lambda f: PromptTuningEmbedding(0, 8), ValueError, ["'num_virtual_tokens'", '0 (int)']),
    Row('prompt-dim-float', lambda f: PromptTuningEmbedding(2, 8.0), TypeError, ["'token_dim'", '8.0 (float)']),
    Row('prompt-init-shape', lambda f: PromptTuningEmbedding(2, 8, prompt_init=np.ones((3, 8), F32)), ValueError,
        ["'prompt_init'", '(2, 8)', '(3, 8)']),
    Row('prompt-param-dtype', lambda f: PromptTuningEmbedding(2, 8, param_init_type=ms.int32), TypeError,
        ["'param_init_type'", 'mindspore.int32']),
    Row('prompt-input-2d', lambda f: PromptTuningEmbedding(2, 8)(Tensor(np.ones((2, 8), F32))), ValueError,
        ["'inputs_embeds'", '(2, 8)']),
    # ----- PST, AdaLoRA, t-SVD -----------------------------------------------------------------------------------
    Row('pst-sparsity-1', lambda f: PSTDense(4, 4, pst_sparsity=1.0), ValueError, ["'pst_sparsity'", '1.0']),
    Row('pst-sparsity-str', lambda f: PSTDense(4, 4, pst_sparsity='0.5'), TypeError,
        ["'pst_sparsity'", "'0.5' (str)"]),
    Row('pst-rank-w-0', lambda f: PSTDense(4, 4, pst_rank_w=0), ValueError, ["'pst_rank_w'", '0 (int)']),
    Row('pst-u-init-shape', lambda f: PSTDense(4, 4, pst_rank_w=2, pst_u_init=np.zeros((2, 4), F32)), ValueError,
        ["'pst_u_init'", '(4, 2)', '(2, 4)']),
    Row('pst-scheduler-final', lambda f: PSTSparsityScheduler(nn.SequentialCell([PSTDense(4, 4)]), 10,
                                                              final_sparsity=1.5),
        ValueError, ["'final_sparsity'", '1.5']),
    Row('pst-scheduler-no-layer', lambda f: PSTSparsityScheduler(nn.Dense(2, 2), 10), ValueError,
        ["'network'", 'PSTDense']),
    Row('adalora-rank-bool', lambda f: AdaLoRADense(4, 4, adalora_rank=True), TypeError,
        ["'adalora_rank'", 'True (bool)']),
    Row('adalora-alpha-0', lambda f: AdaLoRADense(4, 4, adalora_alpha=0), ValueError, ["'adalora_alpha'", '0 (int)']),
    Row('adalora-dropout-int', lambda f: AdaLoRADense(4, 4, adalora_dropout=0), TypeError,
        ["'adalora_dropout'", '0 (int)']),
    Row('adalora-p-init-shape', lambda f: AdaLoRADense(4, 4, adalora_rank=2, adalora_p_init=np.zeros((2, 4), F32)),
        ValueError, ["'adalora_p_init'", '(4, 2)', '(2, 4)']),
    Row('adalora-allocator-no-layer', lambda f: AdaLoRAAllocator(nn.Dense(2, 2), 10), ValueError,
        ["'network'", 'AdaLoRADense']),
    Row('adalora-allocator-steps', lambda f: AdaLoRAAllocator(nn.SequentialCell([AdaLoRADense(4, 4, adalora_rank=2)]),
                                                              0, target_rank=1),
        ValueError, ["'total_steps'", '0 (int)']),
    Row('adalora-allocator-target', lambda f: AdaLoRAAllocator(nn.SequentialCell([AdaLoRADense(4, 4, adalora_rank=2)]),
                                                               10, target_rank=3),
        ValueError, ["'target_rank'", '3']),
    Row('tsvd-rank-too-big', lambda f: tsvd_group(tsvd_rank=5), ValueError, ["'tsvd_rank'", '[1, 4]', '5 (int)']),
    Row('tsvd-std-0', lambda f: tsvd_group(tsvd_init_std=0.0), ValueError, ["'tsvd_init_std'", '0.0 (float)']),
    Row('tsvd-alpha-str', lambda f: tsvd_group(tsvd_alpha='1'), TypeError, ["'tsvd_alpha'", "'1' (str)"]),
    Row('tsvd-layers-0', lambda f: tsvd_group(num_layers=0), ValueError, ["'num_layers'", '0 (int)']),
    Row('tsvd-dense-group', lambda f: TSVDDense(4, 4, None, 0), TypeError, ["'tsvd_group'", 'NoneType']),
    Row('tsvd-dense-index', lambda f: TSVDDense(4, 4, tsvd_group(), 2), ValueError,
        ["'tsvd_index'", '[0, 1]', '2 (int)']),
    Row('tsvd-dense-shape', lambda f: TSVDDense(4, 8, tsvd_group(), 0), ValueError,
        ["'tsvd_group'", 'out_channels=8']),
    Row('tsvd-allocator-not-cell', lambda f: TSVDAllocator('x', 10), TypeError, ["'network'", "'x' (str)"]),
    # ----- shard() strategies --------------------------------------------------------------------------------------
    Row('shard-lora-list', lambda f: lora().shard(strategy_org_dense_matmul=[[1, 1], [1, 1]]), TypeError,
        ["'strategy_org_dense_matmul'", '[[1, 1], [1, 1]] (list)']),
    Row('shard-lora-count', lambda f: lora().shard(strategy_lora_a_matmul=((1, 1),)), ValueError,
        ["'strategy_lora_a_matmul'", '((1, 1),)']),
    Row('shard-lora-zero', lambda f: lora().shard(strategy_lora_add=((1, 0), (1, 1))), TypeError,
        ["'strategy_lora_add'", '((1, 0), (1, 1))']),
    Row('shard-lora-no-bias', lambda f: lora(has_bias=False).shard(strategy_org_bias_add=((1, 1), (1,))),
        ValueError, ["'strategy_org_bias_add'", 'has_bias=False']),
    Row('shard-lora-no-activation', lambda f: lora().shard(strategy_activation=((1, 1),)), ValueError,
        ["'strategy_activation'", 'no activation']),
    Row('shard-lora-mul-scalar', lambda f: lora().shard(strategy_lora_mul=((1, 1), (1,))), ValueError,
        ["'strategy_lora_mul'", '((1, 1), (1,))']),
    Row('shard-adapter-bias-ndim', lambda f: AdapterLayer(8, 4).shard(strategy_bias_down_sampler=((1, 1), (1, 1))),
        ValueError, ["'strategy_bias_down_sampler'", '((1, 1), (1, 1))']),
    Row('shard-adapterdense-no-bias', lambda f: AdapterDense(4, 8, has_bias=False).shard(
        strategy_bias_org=((1, 1), (1,))), ValueError, ["'strategy_bias_org'", 'has_bias=False']),
    Row('shard-lra-nonlinearity', lambda f: LowRankAdapterLayer(8, 2).shard(
        strategy_non_linearity=((1, 1), (1, 1))), ValueError, ["'strategy_non_linearity'", '((1, 1), (1, 1))']),
    Row('shard-prefix-mp', lambda f: PrefixLayer(4, 2, 2, 8, 6, mid_dim=10).shard(model_parallel=3), ValueError,
        ["'model_parallel' (3)", "'mid_dim' (10)"]),
    Row('shard-prefix-attention-mp', lambda f: PrefixAttention(8, 2).shard(model_parallel=3), ValueError,
        ["'model_parallel' (3)", "'num_heads' (2)"]),
    Row('shard-ptuning2-dp', lambda f: PrefixEncoder(4, 2, 2, 3, True, 8, 0.0).shard(0, 1), ValueError,
        ["'data_parallel'", '0 (int)']),
    Row('shard-ptuning2-mp', lambda f: PrefixEncoder(4, 2, 2, 3, True, 8, 0.0).shard(1, 3), ValueError,
        ["'model_parallel' (3)", "'projection_dim' (8)"]),
    Row('shard-dora-scale', lambda f: DoRADense(4, 4, 2, 1).shard(strategy_dora_scale_mul=((1, 1), (1, 1))),
        ValueError, ["'strategy_dora_scale_mul'", '((1, 1), (1, 1))']),
    Row('shard-ia3-str', lambda f: IA3Dense(4, 4).shard(strategy_ia3_mul='x'), TypeError,
        ["'strategy_ia3_mul'", "'x' (str)"]),
    Row('shard-pst-count', lambda f: PSTDense(4, 4).shard(strategy_org_dense_matmul=((1, 1), (1, 1), (1, 1))),
        ValueError, ["'strategy_org_dense_matmul'", '((1, 1), (1, 1), (1, 1))']),
    Row('shard-adalora-float', lambda f: AdaLoRADense(4, 4).shard(strategy_adalora_lambda_mul=((1, 1), (1.0,))),
        TypeError, ["'strategy_adalora_lambda_mul'", '(1.0,)']),
    Row('shard-tsvd-ndim', lambda f: TSVDDense(4, 4, tsvd_group(), 0).shard(strategy_tsvd_add=((1, 1), (1, 1, 1))),
        ValueError, ["'strategy_tsvd_add'", '((1, 1), (1, 1, 1))']),
    Row('shard-unknown-keyword', lambda f: lora().shard(strategy_bogus=((1, 1),)), TypeError, ["'strategy_bogus'"]),
    # ----- freezing ------------------------------------------------------------------------------------------------
    Row('freeze-modules-not-cell', lambda f: freeze_modules(None, include=['*']), TypeError,
        ["'model'", 'None (NoneType)']),
    Row('freeze-modules-nothing', lambda f: freeze_modules(LoRAMLP()), ValueError, ["'include'", "'exclude'"]),
    Row('freeze-modules-str', lambda f: freeze_modules(LoRAMLP(), include='*'), TypeError,
        ["'include'", "'*' (str)"]),
    Row('freeze-modules-no-match', lambda f: freeze_modules(LoRAMLP(), include=['*nothing*']), ValueError,
        ["'*nothing*'", "'include'", 'matches no parameter']),
    Row('freeze-modules-item', lambda f: freeze_modules(LoRAMLP(), exclude=['*', 3]), TypeError,
        ["'exclude'", '3 (int)']),
    Row('freeze-delta-mode', lambda f: freeze_delta(LoRAMLP(), 'lorra'), ValueError, ["'mode'", "'lorra' (str)"]),
    Row('freeze-delta-mode-int', lambda f: freeze_delta(LoRAMLP(), 1), TypeError, ["'mode'", '1 (int)']),
    Row('freeze-delta-absent', lambda f: freeze_delta(LoRAMLP(), 'adapter'), ValueError,
        ["'adapter'", '*mindpet_delta_adapter_*']),
    Row('freeze-delta-exclude', lambda f: freeze_delta(LoRAMLP(), 'lora', exclude=['*nohead*']), ValueError,
        ["'*nohead*'", "'exclude'"]),
    Row('freeze-config-path-int', lambda f: freeze_from_config(LoRAMLP(), 3), TypeError,
        ["'config_path'", '3 (int)']),
    Row('freeze-config-missing', lambda f: freeze_from_config(LoRAMLP(), f.missing), ReadYamlFileError,
        ['missing.ckpt', 'does not exist']),
    Row('freeze-config-typo', lambda f: freeze_from_config(LoRAMLP(), f.freeze_typo), ModelConfigFreezeInfoError,
        ['freeze_typo.yaml', "['includ']"]),
    Row('freeze-config-str', lambda f: freeze_from_config(LoRAMLP(), f.freeze_str), ModelConfigFreezeInfoError,
        ["'freeze.include'", "'*'"]),
    Row('freeze-config-no-section', lambda f: freeze_from_config(LoRAMLP(), f.freeze_nosection),
        ModelConfigFreezeInfoError, ['freeze_nosection.yaml', "no 'freeze' section"]),
    Row('freeze-config-no-match', lambda f: freeze_from_config(LoRAMLP(), f.freeze_nomatch), ValueError,
        ["'*zzz*'", "'include'"]),
    # ----- checkpoint callback -------------------------------------------------------------------------------------
    Row('callback-dir-int', lambda f: TrainableParamsCheckPoint(3), TypeError, ["'directory'", '3 (int)']),
    Row('callback-dir-empty', lambda f: TrainableParamsCheckPoint(''), ValueError, ["'directory'", "''"]),
    Row('callback-prefix-slash', lambda f: TrainableParamsCheckPoint(f.root, prefix='a/b'), ValueError,
        ["'prefix'", "'a/b'"]),
    Row('callback-config-dict', lambda f: TrainableParamsCheckPoint(f.root, config={'save_checkpoint_steps': 1}),
        TypeError, ["'config'", '(dict)']),
    Row('callback-optimizer-int', lambda f: TrainableParamsCheckPoint(f.root, save_optimizer_state=1), TypeError,
        ["'save_optimizer_state'", '1 (int)']),
    Row('callback-rank-dirs-str', lambda f: TrainableParamsCheckPoint(f.root, rank_dirs='yes'), TypeError,
        ["'rank_dirs'", "'yes' (str)"]),
    Row('callback-dir-is-file', lambda f: TrainableParamsCheckPoint(f.not_a_dir).on_train_begin(None),
        MakeDirError, ['not_a_dir.txt', 'not a directory']),
    # ----- base + delta loading, resume, saving ----------------------------------------------------------------------
    Row('load-net-str', lambda f: load_base_and_delta('net', f.base, f.delta), TypeError, ["'net'", "'net' (str)"]),
    Row('load-strict-str', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.delta, strict_base='yes'), TypeError,
        ["'strict_base'", "'yes' (str)"]),
    Row('load-base-missing', lambda f: load_base_and_delta(LoRAMLP(), f.missing, f.delta), CheckpointError,
        ['missing.ckpt', 'does not exist']),
    Row('load-base-path-int', lambda f: load_base_and_delta(LoRAMLP(), 3, f.delta), TypeError,
        ['base checkpoint path', '3 (int)']),
    Row('load-base-dir', lambda f: load_base_and_delta(LoRAMLP(), f.a_dir, f.delta), CheckpointError,
        ['a_dir.ckpt', 'is a directory']),
    Row('load-delta-empty', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.empty), CheckpointError,
        ['empty.ckpt', 'is empty']),
    Row('load-delta-truncated', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.delta_trunc), CheckpointError,
        ['delta_trunc.ckpt', 'truncated or corrupt']),
    Row('load-delta-byte-flipped', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.delta_flip), CheckpointError,
        ['delta_flip.ckpt', 'truncated or corrupt']),
    Row('load-delta-other-model', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.delta_other), CheckpointError,
        ["'fc1.mindpet_delta_lora_a'", 'delta_other.ckpt', '(2, 8)', '(4, 8)']),
    Row('load-base-other-model', lambda f: load_base_and_delta(LoRAMLP(), f.base_other, f.delta), CheckpointError,
        ["'fc1.weight'", 'base_other.ckpt', '(8, 8)', '(16, 8)']),
    Row('load-files-swapped', lambda f: load_base_and_delta(LoRAMLP(), f.delta, f.base), CheckpointError,
        ['base.ckpt', "'fc1.mindpet_delta_lora_a'"]),
    Row('resume-network-str', lambda f: resume_from_checkpoint(f.resume_dir, 'x'), TypeError,
        ["'network'", "'x' (str)"]),
    Row('resume-dir-int', lambda f: resume_from_checkpoint(3, LoRAMLP()), TypeError, ["'directory'", '3 (int)']),
    Row('resume-optimizer-int', lambda f: resume_from_checkpoint(f.resume_dir, LoRAMLP(), optimizer=3), TypeError,
        ["'optimizer'", '3 (int)']),
    Row('resume-prefix-empty', lambda f: resume_from_checkpoint(f.resume_dir, LoRAMLP(), prefix=''), ValueError,
        ["'prefix'", "''"]),
    Row('resume-only-corrupt', lambda f: resume_from_checkpoint(f.resume_dir, LoRAMLP()), CheckpointError,
        ['None of the 1 checkpoint', 'DELTA_CKP-1_1.ckpt', 'truncated or corrupt']),
    Row('save-trainable-path-int', lambda f: save_trainable_params(LoRAMLP(), 3), TypeError, ["'path'", '3 (int)']),
    Row('save-trainable-format', lambda f: save_trainable_params(LoRAMLP(), f.missing, ckpt_format='npz'),
        ValueError, ["'ckpt_format'", "'npz'"]),
    Row('save-trainable-to-dir', lambda f: save_trainable_params(LoRAMLP(), f.a_dir), IsADirectoryError,
        ['a_dir.ckpt', 'is a directory']),
    # ----- configs ---------------------------------------------------------------------------------------------------
    Row('config-no-targets', lambda f: LoraConfig(), ValueError, ["'target_modules'", 'None']),
    Row('config-targets-int', lambda f: LoraConfig(target_modules=3), TypeError, ["'target_modules'", '3 (int)']),
    Row('config-targets-regex', lambda f: LoraConfig(target_modules=['fc[']), ValueError,
        ["'fc['", "'target_modules'", 'regular expression']),
    Row('config-rank-str', lambda f: LoraConfig(target_modules=['fc1'], lora_rank='8'), TypeError,
        ["'lora_rank'", "'8' (str)"]),
    Row('config-dropout-range', lambda f: LoraConfig(target_modules=['fc1'], lora_dropout=1.5), ValueError,
        ["'lora_dropout'", '1.5 (float)']),
    Row('config-dtype-name', lambda f: LoraConfig(target_modules=['fc1'], compute_dtype='fp16'), ValueError,
        ["'compute_dtype'", "'fp16' (str)"]),
    Row('config-unknown-keyword', lambda f: LoraConfig(target_modules=['fc1'], lora_rnk=8), TypeError, ["'lora_rnk'"]),
    Row('dict-unknown-key', lambda f: config_from_dict(lora_cfg(lora_rnk=8)), ModelConfigKeysInfoError,
        ["'lora_rnk'", "did you mean 'lora_rank'"]),
    Row('dict-no-type', lambda f: config_from_dict({'target_modules': ['fc1']}), ModelConfigKeysInfoError,
        ["'type'", "['target_modules']"]),
    Row('dict-type-typo', lambda f: config_from_dict(lora_cfg(type='lorra')), ValueError,
        ["'lorra'", "did you mean 'lora'"]),
    Row('dict-not-mapping', lambda f: config_from_dict(['lora']), ModelConfigParamsInfoError, ["['lora']", '(list)']),
    Row('dict-rank-float', lambda f: config_from_dict(lora_cfg(lora_rank=4.0)), TypeError,
        ["'lora_rank'", '4.0 (float)']),
    Row('dict-other-method', lambda f: LoraConfig.from_dict(lora_cfg(type='ia3')), ModelConfigParamsInfoError,
        ["'type: lora'", "'type: ia3'"]),
    Row('yaml-typo', lambda f: config_from_yaml(f.pet_typo), ModelConfigKeysInfoError,
        ["'lora_ranks'", "did you mean 'lora_rank'"]),
    Row('yaml-wrong-type', lambda f: config_from_yaml(f.pet_wrongtype), TypeError, ["'lora_rank'", "'four' (str)"]),
    Row('yaml-quoted-float', lambda f: config_from_yaml(f.pet_dropout), TypeError,
        ["'lora_dropout'", "'0.1' (str)"]),
    Row('yaml-invalid', lambda f: config_from_yaml(f.pet_bad), ReadYamlFileError, ['pet_bad.yaml', 'not valid YAML']),
    Row('yaml-missing', lambda f: config_from_yaml(f.missing), ReadYamlFileError, ['missing.ckpt', 'does not exist']),
    Row('yaml-no-section', lambda f: config_from_yaml(f.pet_nosection), ModelConfigKeysInfoError,
        ['pet_nosection.yaml', "'pet'"]),
    Row('yaml-section-list', lambda f: config_from_yaml(f.pet_list), ModelConfigParamsInfoError,
        ["['lora', 4]", '(list)']),
    Row('yaml-dir', lambda f: config_from_yaml(f.a_dir), ReadYamlFileError, ['a_dir.ckpt', 'is a directory']),
    Row('yaml-path-int', lambda f: config_from_yaml(3), TypeError, ['config path', '3 (int)']),
    # ----- injection -------------------------------------------------------------------------------------------------
    Row('inject-not-cell', lambda f: get_pet_model('net', LoraConfig(target_modules=['fc1'])), TypeError,
        ["'model'", "'net' (str)"]),
    Row('inject-config-dict', lambda f: get_pet_model(PlainMLP(), {'type': 'lora'}), TypeError,
        ["'config'", "{'type': 'lora'} (dict)"]),
    Row('inject-no-match', lambda f: get_pet_model(PlainMLP(), LoraConfig(target_modules=['q_proj'])), ValueError,
        ["['q_proj']", 'match no adaptable cell', 'fc1']),
    Row('inject-not-dense', lambda f: get_pet_model(PlainMLP(), LoraConfig(target_modules=['act'])), ValueError,
        ["['act']", 'act (ReLU)']),
    Row('inject-name-space', lambda f: get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1']),
                                                     adapter_name='a b'), ValueError, ["'adapter_name'", "'a b'"]),
    Row('inject-name-int', lambda f: get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1']), adapter_name=1),
        TypeError, ["'adapter_name'", '1 (int)']),
    Row('inject-twice', lambda f: get_pet_model(LoRAMLP(), LoraConfig(target_modules=['head'])), ValueError,
        ["'model'", "'fc1.mindpet_delta_lora_a'"]),
    Row('inject-modules-to-save', lambda f: pet(modules_to_save=['nohead']), ValueError,
        ['modules_to_save', "['nohead']"]),
    # ----- adapter save / load --------------------------------------------------------------------------------------
    Row('adapter-dir-missing', lambda f: PetModel.from_pretrained(PlainMLP(), f.missing), AdapterConfigError,
        ['missing.ckpt', 'does not exist']),
    Row('adapter-dir-is-file', lambda f: PetModel.from_pretrained(PlainMLP(), f.base), AdapterConfigError,
        ['base.ckpt', 'is a file']),
    Row('adapter-other-model', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_other), AdapterConfigError,
        ["'fc1.weight'", '(16, 8)', '(8, 8)']),
    Row('adapter-byte-flipped', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_flip), CheckpointError,
        ['adapter_flip', 'SHA-256']),
    Row('adapter-truncated', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_trunc), CheckpointError,
        ['adapter_trunc', 'truncated or corrupt']),
    Row('adapter-no-weights', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_noweights), CheckpointError,
        ['adapter_noweights', 'adapter_model.', '.safetensors', 'does not exist']),
    Row('adapter-yaml-typo', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_typo), ModelConfigKeysInfoError,
        ['adapter_typo', "'lora_rnak'", "did you mean 'lora_rank'"]),
    Row('adapter-yaml-wrong-type', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_wrongtype),
        AdapterConfigError, ['adapter_wrongtype', "'lora_rank'", "'two' (str)"]),
    Row('adapter-yaml-invalid', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_badyaml), ReadYamlFileError,
        ['adapter_badyaml', 'not valid YAML']),
    Row('adapter-load-name-taken', lambda f: pet().load_adapter(f.adapter, 'default'), ValueError,
        ["'default'", 'already exists']),
    Row('adapter-load-trainable-str', lambda f: pet().load_adapter(f.adapter, 'x', is_trainable='y'), TypeError,
        ["'is_trainable'", "'y' (str)"]),
    Row('adapter-set-unknown', lambda f: pet().set_adapter('nope'), ValueError, ["'nope'", 'does not exist']),
    Row('adapter-delete-unknown', lambda f: pet().delete_adapter('zz'), ValueError, ["'zz'", 'does not exist']),
    Row('adapter-save-unknown', lambda f: pet().save_pretrained(f.missing, adapter_name='nope'), ValueError,
        ["'nope'", 'does not exist']),
    Row('adapter-save-dir-int', lambda f: pet().save_pretrained(3), TypeError, ["'save_directory'", '3 (int)']),
    Row('adapter-save-into-file', lambda f: pet().save_pretrained(f.not_a_dir), MakeDirError,
        ['not_a_dir.txt', 'not a directory']),
    Row('adapter-weighted-lengths', lambda f: pet().add_weighted_adapter(['default'], [1.0, 2.0], 'm'), ValueError,
        ["'weights'", '[1.0, 2.0]']),
    Row('adapter-weighted-type', lambda f: pet().add_weighted_adapter(['default'], [1.0], 'm', combination_type='avg'),
        ValueError, ["'combination_type'", "'avg'"]),
    Row('merge-out-path-int', lambda f: merge_into_checkpoint(f.base, f.adapter, 3), TypeError,
        ["'out_path'", '3 (int)']),
    # ----- the mindpet command ---------------------------------------------------------------------------------------
    Row('cli-inspect-missing', lambda f: run_cli('inspect', f.missing), CliError, ['missing.ckpt', 'does not exist']),
    Row('cli-inspect-truncated', lambda f: run_cli('inspect', f.delta_trunc), CliError,
        ['delta_trunc.ckpt', 'truncated or corrupt']),
    Row('cli-inspect-byte-flipped', lambda f: run_cli('inspect', f.delta_flip), CliError,
        ['delta_flip.ckpt', 'truncated or corrupt']),
    Row('cli-inspect-adapter-yaml', lambda f: run_cli('inspect', f.adapter_badyaml), CliError,
        ['adapter_badyaml', 'not valid YAML']),
    Row('cli-inspect-adapter-flipped', lambda f: run_cli('inspect', f.adapter_flip), CliError,
        ['adapter_flip', 'SHA-256']),
    Row('cli-merge-adapter-missing', lambda f: run_cli('merge', '--base', f.base, '--adapter', f.missing,
                                                       '--out', f.missing), CliError, ['missing.ckpt', 'does not exist']),
    Row('cli-merge-base-truncated', lambda f: run_cli('merge', '--base', f.delta_trunc, '--adapter', f.adapter,
                                                      '--out', f.missing), CliError,
        ['delta_trunc.ckpt', 'truncated or corrupt']),
    Row('cli-merge-base-other-model', lambda f: run_cli('merge', '--base', f.base_other, '--adapter', f.adapter,
                                                        '--out', f.missing), CliError,
        ["'fc1.weight'", 'base_other.ckpt']),
    Row('cli-merge-out-extension', lambda f: run_cli('merge', '--base', f.base, '--adapter', f.adapter,
                                                     '--out', os.path.join(f.root, 'merged.npz')), CliError,
        ["'out_path'", 'merged.npz']),
    Row('cli-merge-out-is-dir', lambda f: run_cli('merge', '--base', f.base, '--adapter', f.adapter,
                                                  '--out', f.out_dir_ckpt), CliError,
        ['out_is_dir.ckpt', 'is a directory']),
]

EXPECTED_ROWS = 207


def test_table_size():
    assert len(ROWS) == EXPECTED_ROWS, len(ROWS)
    assert len({row.id for row in ROWS}) == len(ROWS)        # ids are unique


@pytest.mark.parametrize('row', ROWS, ids=[row.id for row in ROWS])
def test_bad_call(row, files):
    with pytest.raises(row.exc) as info:
        row.call(files)
    message = str(info.value)
    missing = [fragment for fragment in row.fragments if fragment not in message]
    assert not missing, f"{row.id}: {missing} not in {message!r}"


# ----- a failed call changes nothing ---------------------------------------------------------------------------------
def _state(net):
    return {p.name: (p.asnumpy().copy(), p.requires_grad) for p in net.get_parameters()}


def _assert_same_state(before, after):
    assert list(before) == list(after)
    for name, (value, grad) in before.items():
        np.testing.assert_array_equal(after[name][0], value, err_msg=name)
        assert after[name][1] == grad, name


def _listing(directory):
    """name -> bytes of every file under ``directory`` (temporary files included)."""
    out = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as handle:
                out[os.path.relpath(path, directory)] = handle.read()
    return out


def test_failed_base_and_delta_load_leaves_the_net_unchanged(files):
    net = LoRAMLP(seed=5)
    freeze_delta(net, 'lora')
    rng = np.random.RandomState(1)
    for param in net.get_parameters():
        param.set_data(Tensor(np.asarray(rng.randn(*param.shape), np.float32)))
    before = _state(net)
    bad = [(files.base, files.delta_trunc), (files.base, files.delta_flip), (files.base, files.delta_other),
           (files.base_other, files.delta), (files.delta, files.base), (files.base, files.empty),
           (files.missing, files.delta), (files.a_dir, files.delta)]
    for base, delta in bad:
        with pytest.raises(CheckpointError):
            load_base_and_delta(net, base, delta)
        _assert_same_state(before, _state(net))
    with pytest.raises(CheckpointError):
        resume_from_checkpoint(files.resume_dir, net)
    _assert_same_state(before, _state(net))
    report = load_base_and_delta(net, files.base, files.delta)             # the good pair still loads
    assert sorted(report.delta_loaded) == sorted(p.name for p in net.trainable_params())
    assert not np.array_equal(net.fc1.mindpet_delta_lora_a.asnumpy(), before['fc1.mindpet_delta_lora_a'][0])


def test_failed_adapter_load_leaves_the_pet_model_unchanged(files):
    model = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=4))
    rng = np.random.RandomState(2)
    for param in model.trainable_params():
        param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32)))
    x = Tensor(rng.randn(3, 8).astype(np.float32))
    out = model(x).asnumpy()
    before, layers = _state(model), sorted(model.pet_layers)
    broken = {files.adapter_flip: CheckpointError, files.adapter_trunc: CheckpointError,
              files.adapter_noweights: CheckpointError, files.adapter_typo: ModelConfigKeysInfoError,
              files.adapter_wrongtype: AdapterConfigError, files.adapter_badyaml: ReadYamlFileError,
              files.adapter_other: AdapterConfigError, files.missing: AdapterConfigError,
              files.base: AdapterConfigError}
    for directory, error in broken.items():
        with pytest.raises(error):
            model.load_adapter(directory, 'new')
        assert model.adapters == ['default'] and model.active_adapter == 'default'
        assert sorted(model.pet_layers) == layers
        _assert_same_state(before, _state(model))
    np.testing.assert_array_equal(model(x).asnumpy(), out)
    model.load_adapter(files.adapter, 'new')                                # the intact copy loads
    assert model.adapters == ['default', 'new']


def test_failed_from_pretrained_leaves_the_model_unadapted(files):
    model = PlainMLP()
    before = _state(model)
    for directory in (files.adapter_flip, files.adapter_other, files.adapter_typo, files.adapter_trunc):
        with pytest.raises((CheckpointError, AdapterConfigError, ModelConfigKeysInfoError)):
            PetModel.from_pretrained(model, directory)
        assert type(model.fc1) is nn.Dense and type(model.fc2) is nn.Dense  # pylint: disable=unidiomatic-typecheck
        _assert_same_state(before, _state(model))


def test_failed_freeze_leaves_requires_grad_unchanged(files):
    net = LoRAMLP()
    freeze_delta(net, 'lora', exclude=['head.*'])
    before = _state(net)
    calls = [lambda: freeze_delta(net, 'lora', exclude=['*nohead*']),
             lambda: freeze_delta(net, 'adapter'),
             lambda: freeze_modules(net, include=['*'], exclude=['*nohead*']),
             lambda: freeze_modules(net, include=['*', 3]),
             lambda: freeze_from_config(net, files.freeze_nomatch),
             lambda: freeze_from_config(net, files.freeze_typo),
             lambda: freeze_from_config(net, files.pet_bad)]
    for call in calls:
        with pytest.raises((TypeError, ValueError, ModelConfigFreezeInfoError, ReadYamlFileError)):
            call()
        _assert_same_state(before, _state(net))


class _DiskFullAfter:
    """Stands in for the ``os`` module of ``mindpet.utils.dir_commit``: the file writes after the first ``ok`` ones
    put half of their bytes on disk, then fail as a full disk does."""

    def __init__(self, ok):
        self.ok = ok
        self.calls = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        self.calls += 1
        if self.calls <= self.ok:
            return os.write(fd, data)
        os.write(fd, bytes(data[:len(data) // 2]))
        raise OSError(28, 'No space left on device')


def test_failed_save_keeps_the_previous_adapter_whole(files, tmp_path, monkeypatch):
    """A save that fails while writing the tensor file, or the config after it, leaves the directory as it was:
    the previous adapter byte-identical and loadable, no temporary file, and a CheckpointError naming the file."""
    import mindpet.utils.dir_commit as dir_commit  # pylint: disable=import-outside-toplevel
    model = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'], lora_rank=2))
    target = str(tmp_path / 'adapter')
    model.save_pretrained(target)
    saved = _listing(target)
    model.base_model.fc1.mindpet_delta_lora_b.set_data(Tensor(np.ones((16, 2), np.float32)))
    for ok, failing in ((0, 'adapter_model.'), (1, ADAPTER_CONFIG_NAME)):
        monkeypatch.setattr(dir_commit, 'os', _DiskFullAfter(ok))
        with pytest.raises(CheckpointError, match='No space left') as info:
            model.save_pretrained(target)
        monkeypatch.undo()
        assert os.path.join(target, failing) in str(info.value) and '.tmp' not in str(info.value)
        assert _listing(target) == saved
        loaded = PetModel.from_pretrained(PlainMLP(), target)
        np.testing.assert_array_equal(loaded.base_model.fc1.mindpet_delta_lora_b.asnumpy(), np.zeros((16, 2)))
    model.save_pretrained(target)          # with room again: the new adapter replaces the old one
    loaded = PetModel.from_pretrained(PlainMLP(), target)
    np.testing.assert_array_equal(loaded.base_model.fc1.mindpet_delta_lora_b.asnumpy(), np.ones((16, 2)))
    assert len(_listing(target)) == 2


def test_failed_merge_writes_nothing(files, tmp_path):
    out = str(tmp_path / 'merged.ckpt')
    with pytest.raises(CliError):
        run_cli('merge', '--base', files.base_other, '--adapter', files.adapter, '--out', out)
    assert os.listdir(str(tmp_path)) == []
    assert cli.main(['merge', '--base', files.base, '--adapter', files.adapter, '--out', out]) == 0
    good = _listing(str(tmp_path))
    for base, adapter in ((files.delta_trunc, files.adapter), (files.base, files.adapter_flip),
                          (files.base_other, files.adapter)):
        with pytest.raises(CliError):
            run_cli('merge', '--base', base, '--adapter', adapter, '--out', out)
        assert _listing(str(tmp_path)) == good                             # the earlier output is untouched


# ----- unreadable and unwritable paths -------------------------------------------------------------------------------
_CHILD = r'''
import contextlib, io, json, os, sys
import mindspore as ms
ms.set_context(device_target='CPU')
from mindpet import LoraConfig, PetModel, cli, config_from_yaml, get_pet_model
from mindpet.graph import freeze_from_config
from mindpet.graph.ckpt_util import load_base_and_delta
from tests.nets import LoRAMLP, PlainMLP
paths = json.loads(sys.argv[1])
calls = {
    'ckpt': lambda: load_base_and_delta(LoRAMLP(), paths['base'], paths['delta']),
    'yaml': lambda: config_from_yaml(paths['yaml']),
    'freeze': lambda: freeze_from_config(LoRAMLP(), paths['yaml']),
    'adapter_dir': lambda: PetModel.from_pretrained(PlainMLP(), paths['adapter_dir']),
    'adapter_weights': lambda: PetModel.from_pretrained(PlainMLP(), paths['adapter_weights']),
    'save_into': lambda: get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'])).save_pretrained(
        paths['readonly']),
    'save_below': lambda: get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'])).save_pretrained(
        os.path.join(paths['readonly'], 'sub')),
}
report = {}
for name, call in calls.items():
    try:
        call()
        report[name] = ['no error', '']
    except Exception as ex:  # pylint: disable=broad-except
        report[name] = [type(ex).__name__, str(ex)]
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(['inspect', paths['base']])
report['cli'] = [code, err.getvalue()]
print(json.dumps(report))
'''


def test_unreadable_and_unwritable_paths_give_one_clear_error(files, tmp_path):
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which('setpriv'):
            pytest.skip('running as root without setpriv: permission bits cannot be enforced')
        prefix = SETPRIV
    root = str(tmp_path)
    paths = {'base': os.path.join(root, 'base.ckpt'), 'delta': files.delta,
             'yaml': os.path.join(root, 'pet.yaml'), 'adapter_dir': os.path.join(root, 'adapter_dir'),
             'adapter_weights': os.path.join(root, 'adapter_weights'), 'readonly': os.path.join(root, 'readonly')}
    shutil.copy(files.base, paths['base'])
    shutil.copy(files.pet_typo, paths['yaml'])
    shutil.copytree(files.adapter, paths['adapter_dir'])
    shutil.copytree(files.adapter, paths['adapter_weights'])
    os.makedirs(paths['readonly'])
    weights = adapter_weights_path(paths['adapter_weights'])
    for path in (paths['base'], paths['yaml'], weights):
        os.chmod(path, 0)
    os.chmod(paths['adapter_dir'], 0)
    os.chmod(paths['readonly'], stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    env = {k: v for k, v in os.environ.items() if not k.startswith('MS_COMPILER_CACHE')}
    env.update(PYTHONPATH=ROOT, GLOG_v='3')
    try:
        proc = subprocess.run(prefix + [sys.executable, '-B', '-c', _CHILD, json.dumps(paths)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        for path in (paths['base'], paths['yaml'], weights,
                     paths['adapter_dir'], paths['readonly']):
            os.chmod(path, stat.S_IRWXU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    denied = 'Permission denied'
    expected = {'ckpt': ('CheckpointError', ['base.ckpt', 'cannot be read', denied]),
                'yaml': ('ReadYamlFileError', ['pet.yaml', 'cannot be read', denied]),
                'freeze': ('ReadYamlFileError', ['pet.yaml', 'cannot be read', denied]),
                'adapter_dir': ('AdapterConfigError', ['adapter_dir', 'cannot be read', denied]),
                'adapter_weights': ('CheckpointError', ['adapter_weights', os.path.basename(weights), denied]),
                'save_into': ('CheckpointError', [os.path.join('readonly', 'adapter_model.'), denied]),
                'save_below': ('MakeDirError', [os.path.join('readonly', 'sub'), denied])}
    for name, (error, fragments) in expected.items():
        kind, message = report[name]
        assert kind == error, (name, report[name])
        assert all(fragment in message for fragment in fragments), (name, message)
        assert '.tmp' not in message, (name, message)                    # the destination, not a temporary name
    code, err = report['cli']
    assert code == 1 and err.count('\n') == 1 and err.startswith('mindpet inspect: error: '), err
    assert 'base.ckpt' in err and denied in err
    assert os.listdir(paths['readonly']) == []                          # nothing written, not even a temp file


# ----- property-based tests of the config parser ---------------------------------------------------------------------
PROPERTIES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LORA_KEYS = ['type'] + LoraConfig.field_names()
PATTERN = st.from_regex(r'[a-z_][a-z0-9_]{0,8}(\.[a-z0-9_]{1,5}){0,2}', fullmatch=True)
PATTERNS = st.lists(PATTERN, min_size=1, max_size=4)
FINITE = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def lora_configs(draw):
    """Keyword arguments of a valid LoraConfig, in the forms users write (a str for one pattern, 0 for dropout)."""
    kwargs = {'target_modules': draw(st.one_of(PATTERNS, PATTERN))}
    if draw(st.booleans()):
        kwargs['exclude_modules'] = draw(st.one_of(st.none(), PATTERNS))
    if draw(st.booleans()):
        kwargs['modules_to_save'] = draw(st.one_of(st.none(), PATTERNS))
    if draw(st.booleans()):
        kwargs['lora_rank'] = draw(st.integers(1, 4096))
    if draw(st.booleans()):
        kwargs['lora_alpha'] = draw(st.one_of(st.integers(-10 ** 6, 10 ** 6), FINITE).filter(lambda v: v != 0))
    if draw(st.booleans()):
        kwargs['lora_dropout'] = draw(st.one_of(st.just(0), st.floats(0.0, 1.0, exclude_max=True)))
    if draw(st.booleans()):
        kwargs['compute_dtype'] = draw(st.sampled_from([None, 'float32', 'float16', 'bfloat16']))
    return kwargs


@PROPERTIES
@given(kwargs=lora_configs())
def test_property_valid_configs_round_trip(kwargs, tmp_path_factory):
    config = LoraConfig(**kwargs)
    data = config.to_dict()
    assert list(data) == LORA_KEYS
    assert config_from_dict(data) == config
    assert config_from_dict(data).to_dict() == data                     # to_dict is a fixed point
    text = yaml.safe_dump({'pet': data})                                # what save_pretrained / users write
    assert config_from_dict(yaml.safe_load(text)['pet']) == config
    path = os.path.join(str(tmp_path_factory.getbasetemp()), 'property_round_trip.yaml')
    with open(path, 'w', encoding='utf-8') as handle:
        handle.write(text)
    assert config_from_yaml(path) == config
    # the normal forms: one pattern becomes a list, an int 0 dropout a float
    target = kwargs['target_modules']
    assert data['target_modules'] == ([target] if isinstance(target, str) else target)
    assert isinstance(data['lora_dropout'], float)


UNKNOWN_KEYS = st.one_of(st.text(min_size=1, max_size=20), st.integers(), st.booleans(), st.none(),
                         st.floats(allow_nan=False)).filter(lambda k: k not in LORA_KEYS)
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), FINITE, st.text(max_size=5),
                      st.lists(st.integers(), max_size=2))


@PROPERTIES
@given(kwargs=lora_configs(), key=UNKNOWN_KEYS, value=ANY_VALUE)
def test_property_unknown_keys_are_named(kwargs, key, value):
    data = LoraConfig(**kwargs).to_dict()
    data[key] = value
    with pytest.raises(ModelConfigKeysInfoError) as info:
        config_from_dict(data)
    assert f'Unknown key {key!r}' in str(info.value)


@st.composite
def typos(draw):
    """A valid key with one character deleted, doubled or replaced -- the usual YAML typo."""
    key = draw(st.sampled_from(LoraConfig.field_names()))
    index = draw(st.integers(0, len(key) - 1))
    kind = draw(st.sampled_from(['delete', 'double', 'replace']))
    if kind == 'delete':
        typo = key[:index] + key[index + 1:]
    elif kind == 'double':
        typo = key[:index] + key[index] + key[index:]
    else:
        typo = key[:index] + draw(st.sampled_from('abcdefghijklmnopqrstuvwxyz_')) + key[index + 1:]
    return key, typo


@PROPERTIES
@given(kwargs=lora_configs(), pair=typos())
def test_property_typos_suggest_the_key(kwargs, pair):
    key, typo = pair
    data = LoraConfig(**kwargs).to_dict()
    if typo in data:
        return                                                          # the "typo" is the key itself
    data[typo] = data.pop(key)
    with pytest.raises(ModelConfigKeysInfoError) as info:
        config_from_dict(data)
    assert f'Unknown key {typo!r}' in str(info.value) and f"did you mean {key!r}" in str(info.value)


NOT_A_LIST = st.one_of(st.integers(), FINITE, st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=2))
BAD_PATTERNS = st.one_of(NOT_A_LIST, st.just([]), st.lists(st.one_of(st.integers(), st.none(), FINITE), min_size=1,
                                                          max_size=3),
                         st.sampled_from(['(', 'fc[', '*q_proj', ['ok', '+x']]))
WRONG = {
    'lora_rank': st.one_of(FINITE, st.text(max_size=5), st.booleans(), st.none(), st.integers(max_value=0),
                           st.lists(st.integers(1, 8), min_size=1, max_size=2)),
    'lora_alpha': st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.sampled_from([0, 0.0, -0.0]),
                            st.sampled_from([math.nan, math.inf, -math.inf]), st.lists(st.integers(), max_size=2)),
    'lora_dropout': st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.integers().filter(lambda v: v != 0),
                              st.floats().filter(lambda v: not 0.0 <= v < 1.0)),
    'compute_dtype': st.one_of(st.text(max_size=8).filter(lambda v: v not in ('float32', 'float16', 'bfloat16')),
                               st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2)),
    'target_modules': st.one_of(BAD_PATTERNS, st.none()),
    'exclude_modules': BAD_PATTERNS,
    'modules_to_save': BAD_PATTERNS,
}


@PROPERTIES
@given(kwargs=lora_configs(), field=st.sampled_from(sorted(WRONG)), data=st.data())
def test_property_wrong_values_name_the_field(kwargs, field, data):
    value = data.draw(WRONG[field], label=field)
    config = LoraConfig(**kwargs).to_dict()
    config[field] = value
    with pytest.raises((TypeError, ValueError)) as info:
        config_from_dict(config)
    assert f"'{field}'" in str(info.value), str(info.value)


@PROPERTIES
@given(data=st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.text(max_size=3), max_size=3)))
def test_property_non_mappings_are_refused(data):
    with pytest.raises(ModelConfigParamsInfoError) as info:
        config_from_dict(data)
    assert repr(data)[:20] in str(info.value)
