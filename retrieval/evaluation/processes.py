"""The processes that share one evaluation (``accelerate launch``): who is who, and the few collectives the
harness needs.

One process (``Processes()``, the default) needs no set-up and every collective is a no-op, so callers that
run the harness on one process of a distributed job (a training run's validation on the main process) are
unaffected. ``Processes(PartialState(...))`` under ``accelerate launch`` spreads the extraction over the
launched processes. Tensors of collectives live on the state's device (NCCL moves only CUDA tensors; gloo
takes CPU ones).
"""
from __future__ import annotations

import numpy as np
import torch


class Processes:
    def __init__(self, state=None):
        #: an ``accelerate.PartialState``; None: this process alone
        self.state = state if state is not None and state.num_processes > 1 else None

    @property
    def rank(self) -> int:
        return 0 if self.state is None else self.state.process_index

    @property
    def count(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Barrier: returns once every process has reached it."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value):
        """The main process's ``value`` on every process (any picklable object; others pass anything)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, values: list[float]) -> np.ndarray:
        """(count, len(values)): every process's ``values``, by rank (a device-tensor all-gather)."""
        local = torch.tensor([values], dtype=torch.float64,
                             device=None if self.state is None else self.state.device)
        if self.state is None:
            return local.numpy()
        from accelerate.utils import gather

        return gather(local).cpu().numpy()
