"""Bad input to every delta Cell constructor and ``shard()``: one table of bad calls, each must raise the given
exception naming the argument and the value received (runner and Row in tests/bad_input.py). The rank and memory
rows also show the refusal came before the Cell allocated anything of note (:func:`refused`)."""
import contextlib
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import mint, nn, Tensor

from mindpet.delta import (LoRADense, AdapterLayer, AdapterDense, LowRankAdapterLayer, LowRankAdapterDense,
                           PrefixLayer, PrefixAttention, PrefixEncoder, RDropLoss, rdrop_repeat, DoRADense, DoraLayer,
                           IA3Dense, PromptTuningEmbedding, PSTDense, PSTSparsityScheduler, AdaLoRADense,
                           AdaLoRAAllocator, TSVDGroup, TSVDDense, TSVDAllocator)
from mindpet.delta.layer_kinds import kind_of
from mindpet.delta.prompt_tuning import EmbeddingWithPrompt
from mindpet.utils import validation

from tests.bad_input import Row, check_row, check_table, rows


def lora(**kw):
    args = dict(in_channels=4, out_channels=4, lora_rank=2, lora_alpha=4)
    args.update(kw)
    return LoRADense(**args)


def tsvd_group(**kw):
    args = dict(in_channels=4, out_channels=4, num_layers=2, tsvd_rank=2)
    args.update(kw)
    return TSVDGroup(**args)


F32 = np.float32
MB = 1 << 20
#: the memory the memory rows pretend is available; each of their refused tensors needs 64 MB or more
SMALL_MEMORY = 16 * MB
#: a (BIG, BIG) float32 tensor is 64 MB: a refusal after allocating it would show in the peak RSS
BIG = 4096


def _status_bytes(key):
    with open('/proc/self/status', encoding='ascii') as handle:
        for line in handle:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
    return None


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open('/proc/self/clear_refs', 'w', encoding='ascii') as handle:
            handle.write('5')
        return _status_bytes('VmHWM') is not None
    except OSError:
        return False


def refused(build, available=None):
    """Run ``build``, which must raise, with ``available`` bytes pretended to be the free memory (None: the real
    figure); then check the peak RSS grew by less than SMALL_MEMORY, i.e. the refusal came before the 64 MB tensor
    of the row was allocated (a call that raises nothing fails its row anyway)."""
    with _peak_growth_below_small(available, "the refused call allocated {:.1f} MB before refusing"):
        build()


@contextlib.contextmanager
def _peak_growth_below_small(available, message):
    """Run the body with ``available`` bytes pretended to be the free memory (None: the real figure), then assert
    the peak RSS grew by less than SMALL_MEMORY (``message`` gets the growth in MB), also when the body raised."""
    original = validation.available_memory_bytes
    if available is not None:
        validation.available_memory_bytes = lambda: available
    measured = _reset_peak_rss()
    before = _status_bytes('VmRSS')
    try:
        yield
    finally:
        validation.available_memory_bytes = original
        if measured:
            grown = _status_bytes('VmHWM') - before
            assert grown < SMALL_MEMORY, message.format(grown / MB)


def low_memory(build):
    return refused(build, SMALL_MEMORY)


LINEAR_8_4 = mint.nn.Linear(8, 4)
MEMORY = ['more than the 16.0 MB of memory available here']
odd_logits = Tensor(np.ones((3, 2), F32))
odd_labels = Tensor(np.zeros(3, np.int32))


# Each call takes the Files (None: these rows read no file); fragments must all be in str(exception).
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
    Row('pst-u-init-shape', lambda f: PSTDense(4, 4, pst_rank_w=2, pst_rank_m=2, pst_u_init=np.zeros((2, 4), F32)),
        ValueError, ["'pst_u_init'", '(4, 2)', '(2, 4)']),
    Row('pst-scheduler-final', lambda f: PSTSparsityScheduler(nn.SequentialCell([PSTDense(4, 4, 2, 2)]), 10,
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
    Row('tsvd-rank-too-big', lambda f: tsvd_group(tsvd_rank=5), ValueError,
        ["'tsvd_rank'", 'min(in_channels, out_channels) = 4', 'but got 5']),
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
    Row('shard-pst-count', lambda f: PSTDense(4, 4, 2, 2).shard(strategy_org_dense_matmul=((1, 1), (1, 1), (1, 1))),
        ValueError, ["'strategy_org_dense_matmul'", '((1, 1), (1, 1), (1, 1))']),
    Row('shard-adalora-float', lambda f: AdaLoRADense(4, 4, adalora_rank=2).shard(
        strategy_adalora_lambda_mul=((1, 1), (1.0,))),
        TypeError, ["'strategy_adalora_lambda_mul'", '(1.0,)']),
    Row('shard-tsvd-ndim', lambda f: TSVDDense(4, 4, tsvd_group(), 0).shard(strategy_tsvd_add=((1, 1), (1, 1, 1))),
        ValueError, ["'strategy_tsvd_add'", '((1, 1), (1, 1, 1))']),
    Row('shard-unknown-keyword', lambda f: lora().shard(strategy_bogus=((1, 1),)), TypeError, ["'strategy_bogus'"]),
    # ----- ranks above what the layer can hold: refused before the (BIG, BIG) base weight is allocated ---------------
    Row('rank-dora', lambda f: refused(lambda: DoRADense(BIG, BIG, lora_rank=BIG + 1, lora_alpha=1)), ValueError,
        ["'DoRADense'", "'lora_rank'", f'min(in_channels, out_channels) = {BIG}', f'but got {BIG + 1}']),
    Row('rank-dora-layer', lambda f: refused(lambda: DoraLayer(LINEAR_8_4, kind_of(LINEAR_8_4), 5, 1)), ValueError,
        ["'DoraLayer'", "'lora_rank'", 'min(in_channels, out_channels) = 4', 'but got 5']),
    Row('rank-adalora', lambda f: refused(lambda: AdaLoRADense(BIG, BIG, adalora_rank=BIG + 1)), ValueError,
        ["'AdaLoRADense'", "'adalora_rank'", f'= {BIG}', f'but got {BIG + 1}']),
    Row('rank-pst-w', lambda f: refused(lambda: PSTDense(BIG, BIG, pst_rank_w=BIG + 1, pst_rank_m=1)), ValueError,
        ["'PSTDense'", "'pst_rank_w'", f'= {BIG}', f'but got {BIG + 1}']),
    Row('rank-pst-m', lambda f: refused(lambda: PSTDense(BIG, BIG, pst_rank_w=1, pst_rank_m=BIG + 1)), ValueError,
        ["'PSTDense'", "'pst_rank_m'", f'= {BIG}', f'but got {BIG + 1}']),
    Row('rank-tsvd-group', lambda f: refused(lambda: TSVDGroup(BIG, 8, 2, tsvd_rank=9)), ValueError,
        ["'TSVDGroup'", "'tsvd_rank'", 'min(in_channels, out_channels) = 8', 'but got 9']),
    Row('rank-lra-layer', lambda f: refused(lambda: LowRankAdapterLayer(8, 2, low_rank_size=5)), ValueError,
        ["'LowRankAdapterLayer'", "'low_rank_size'", 'the bottleneck hidden_size // reduction_factor = 4',
         'but got 5']),
    Row('rank-lra-dense', lambda f: refused(lambda: LowRankAdapterDense(BIG, BIG, reduction_factor=BIG,
                                                                        low_rank_size=2)), ValueError,
        ["'LowRankAdapterDense'", "'low_rank_size'", 'the bottleneck out_channels // reduction_factor = 1',
         'but got 2']),
    # ----- sizes beyond the (pretended) free memory: refused with the estimate, before allocating -----------------
    Row('memory-lora', lambda f: low_memory(lambda: LoRADense(BIG, BIG, 1, 1)), ValueError,
        ["'LoRADense'", "'in_channels' and 'out_channels'", f'({BIG}, {BIG})', 'about 64.0 MB'] + MEMORY),
    Row('memory-dora', lambda f: low_memory(lambda: DoRADense(BIG, BIG, 1, 1)), ValueError,
        ["'DoRADense'", "'in_channels' and 'out_channels'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-adalora', lambda f: low_memory(lambda: AdaLoRADense(BIG, BIG, adalora_rank=1)), ValueError,
        ["'AdaLoRADense'", "'in_channels' and 'out_channels'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-pst', lambda f: low_memory(lambda: PSTDense(BIG, BIG, 1, 1)), ValueError,
        ["'PSTDense'", "'in_channels' and 'out_channels'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-ia3', lambda f: low_memory(lambda: IA3Dense(BIG, BIG)), ValueError,
        ["'IA3Dense'", "'in_channels' and 'out_channels'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-tsvd-group-rank', lambda f: low_memory(lambda: TSVDGroup(BIG, BIG, 2, tsvd_rank=512)), ValueError,
        ["'TSVDGroup'", "'tsvd_rank'", f'({BIG}, 512, 2)', 'about 64.0 MB'] + MEMORY),
    Row('memory-tsvd-group-layers', lambda f: low_memory(lambda: TSVDGroup(4, 4, 256, tsvd_rank=1)), ValueError,
        ["'TSVDGroup'", "'num_layers'", '(256, 65536)', 'about 64.0 MB'] + MEMORY),
    Row('memory-tsvd-dense', lambda f: low_memory(lambda: TSVDDense(BIG, BIG, TSVDGroup(BIG, BIG, 2, 1), 0)),
        ValueError, ["'TSVDDense'", "'in_channels' and 'out_channels'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-adapter-layer', lambda f: low_memory(lambda: AdapterLayer(BIG, bottleneck_size=BIG)), ValueError,
        ["'AdapterLayer'", "'hidden_size' and 'bottleneck_size'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-adapter-dense', lambda f: low_memory(lambda: AdapterDense(BIG, BIG, bottleneck_size=1)), ValueError,
        ["'AdapterDense'", "'in_channels' and 'out_channels'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-lra-layer', lambda f: low_memory(lambda: LowRankAdapterLayer(16 * BIG, 1, low_rank_size=256)),
        ValueError, ["'LowRankAdapterLayer'", "'hidden_size' and 'low_rank_size'", f'({16 * BIG}, 256)'] + MEMORY),
    Row('memory-lra-dense', lambda f: low_memory(lambda: LowRankAdapterDense(BIG, BIG)), ValueError,
        ["'LowRankAdapterDense'", "'in_channels' and 'out_channels'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-prefix-layer', lambda f: low_memory(lambda: PrefixLayer(4, 1, 2, 8, embed_dim=BIG, mid_dim=BIG)),
        ValueError, ["'PrefixLayer'", "'mid_dim' and 'embed_dim'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-prefix-attention', lambda f: low_memory(lambda: PrefixAttention(BIG, 2)), ValueError,
        ["'PrefixAttention'", "'hidden_size'", f'({BIG}, {BIG})'] + MEMORY),
    Row('memory-ptuning2', lambda f: low_memory(lambda: PrefixEncoder(BIG, 2, 2, 1024, False, 8, 0.0)), ValueError,
        ["'PrefixEncoder'", "'pre_seq_len', 'num_layers', 'num_heads' and 'kv_channels'", f'({BIG}, 8192)']
        + MEMORY),
    Row('memory-prompt', lambda f: low_memory(lambda: PromptTuningEmbedding(BIG, BIG)), ValueError,
        ["'PromptTuningEmbedding'", "'num_virtual_tokens' and 'token_dim'", f'({BIG}, {BIG})'] + MEMORY),
]

EXPECTED_ROWS = 131


def test_table_size():
    check_table(ROWS, EXPECTED_ROWS)


@rows(ROWS)
def test_bad_call(row):
    check_row(row)


@pytest.mark.parametrize('build', [
    lambda: LoRADense(BIG, BIG, 1, 1, weight_init='zeros'),
    lambda: AdapterDense(BIG, BIG, weight_init='zeros', bottleneck_size=1),
    lambda: EmbeddingWithPrompt(BIG, BIG, 2),
], ids=['lora', 'adapter-dense', 'embedding-with-prompt'])
def test_a_zero_base_weight_is_not_refused_for_size(build):
    """The tuners build delta Cells with a 'zeros' base weight and then adopt the base layer's Parameter: such a
    weight costs no resident memory (its pages are never written), so a layer as large as the free memory (here a
    64 MB weight with 16 MB pretended free) is built, and the peak RSS grows by far less than the weight."""
    with _peak_growth_below_small(SMALL_MEMORY, "building the layer grew the peak RSS by {:.1f} MB"):
        build()


def test_refused_notices_an_allocation_made_before_the_refusal():
    """The rows' RSS check itself: a call that fills a 64 MB array and only then raises is caught."""
    def late_refusal():
        np.ones((BIG, BIG), F32)
        raise ValueError('refused late')
    if not _reset_peak_rss():
        pytest.skip('no peak-RSS reset (/proc/self/clear_refs) here: the rows check the error only')
    with pytest.raises(AssertionError, match='MB before refusing'):
        refused(late_refusal)
