"""Training hooks: what a method does around each training step (PST's sparsity schedule, AdaLoRA's and t-SVD's
rank budgets). :meth:`mindpet.PetModel.training_hook` returns the active method's hook.
"""
from mindspore import nn
from mindspore.train import Callback

from mindpet.delta.rank_allocation import TrainStepWithGrads, WithOrthRegularizer


class TrainingHook(Callback):
    """Drives a method's per-step schedule while a :class:`mindpet.PetModel` trains (PST's sparsity, AdaLoRA's
    and t-SVD's rank budgets); methods without one get this do-nothing base. Obtain it with
    ``pet.training_hook(total_steps)``.

    In a custom loop::

        hook = pet.training_hook(total_steps=T)
        step = hook.train_network(loss_net, optimizer)     # the step Cell the method needs
        for i in range(T):
            hook.before_step(i)
            outputs = step(*batch)
            hook.after_step(i, outputs)
            loss = hook.loss(outputs)

    With ``Model.train`` the hook is the callback (non-sink mode: it acts at every step)::

        model = Model(hook.train_network(loss_net, optimizer))
        model.train(epochs, dataset, callbacks=[hook], dataset_sink_mode=False)

    Args:
        pet (PetModel): the model being trained.
    """

    def __init__(self, pet):
        super().__init__()
        self.pet = pet
        self.train_net = None

    def train_network(self, loss_net, optimizer):
        """The training-step Cell around ``loss_net`` (a Cell returning the scalar loss) and ``optimizer``.
        Default: ``nn.TrainOneStepCell``."""
        self.train_net = nn.TrainOneStepCell(loss_net, optimizer)
        return self.train_net

    @staticmethod
    def loss(outputs):
        """The loss Tensor in a training step's outputs."""
        return outputs[0] if isinstance(outputs, (tuple, list)) else outputs

    def before_step(self, step):
        """Call before training step ``step`` (0-based)."""

    def after_step(self, step, outputs):
        """Call after training step ``step`` (0-based) with the step Cell's outputs."""

    def on_train_step_begin(self, run_context):
        self.before_step(run_context.original_args().cur_step_num - 1)

    def on_train_step_end(self, run_context):
        args = run_context.original_args()
        self.after_step(args.cur_step_num - 1, args.net_outputs)


class RankAllocationHook(TrainingHook):
    """For methods whose rank falls during training (AdaLoRA, t-SVD): the loss gets the orthogonality regulariser,
    the step also returns its gradients, and after each step the allocator re-decides which singular values stay.

    Args:
        pet (PetModel): the model being trained.
        allocator (mindpet.delta.rank_allocation.RankAllocator): the method's allocator over ``pet``'s layers.
        orth_reg_weight (float): weight of the orthogonality regulariser (0: none).
    """

    def __init__(self, pet, allocator, orth_reg_weight):
        super().__init__(pet)
        self.allocator = allocator
        self.orth_reg_weight = orth_reg_weight
        self.budget = allocator.init_budget

    def train_network(self, loss_net, optimizer):
        """``TrainStepWithGrads(WithOrthRegularizer(loss_net, orth_reg_weight), optimizer)``: returns
        ``(loss, grads)``."""
        if self.orth_reg_weight > 0:
            loss_net = WithOrthRegularizer(loss_net, self.orth_reg_weight)
        self.train_net = TrainStepWithGrads(loss_net, optimizer)
        return self.train_net

    def after_step(self, step, outputs):
        """``outputs``: the ``(loss, grads)`` of :meth:`train_network`'s Cell, or a dict ``parameter name ->
        gradient`` (from a step Cell of your own)."""
        if isinstance(outputs, dict):
            grads = outputs
        elif isinstance(outputs, (tuple, list)) and len(outputs) == 2 and self.train_net is not None:
            grads = self.train_net.grad_dict(outputs[1])
        else:
            raise TypeError(f"For '{type(self).__name__}.after_step', the 'outputs' must be the (loss, grads) of "
                            f"the Cell from train_network(), or a dict of parameter name -> gradient, but got "
                            f"{type(outputs).__name__}.")
        self.budget = self.allocator.update_and_allocate(step, grads)

    def rank_pattern(self):
        """``{layer or group name: kept rank}`` decided so far."""
        return self.allocator.rank_pattern()


def schedule_steps(method, config, total_steps):
    """The number of training steps a schedule runs over: ``total_steps`` if given, else the config's
    ``total_step``; ValueError naming both when neither is set."""
    steps = total_steps if total_steps is not None else config.total_step
    if steps is None:
        raise ValueError(f"For 'training_hook', the '{method}' schedule needs the number of training steps: pass "
                         f"'total_steps' or set 'total_step' in the config, but both are None.")
    return steps
