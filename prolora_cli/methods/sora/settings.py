"""SoRA's settings and their flags (torch-free: the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from prolora_cli.errors import UserError
from prolora_cli.methods.settings import Settings, flag

TITLE = "SoRA"


@dataclass
class SoRASettings(Settings):
    sparse_lambda: float = flag(10.0, "--sparse-lambda",
                                help="Weight eta of the mean-|g| L1 penalty on the gates (authors' sparse_lambda).")
    sparse_lambda_2: float = flag(3e-4, "--sparse-lambda-2",
                                  help="Threshold xi of the gates' proximal step (authors' sparse_lambda_2).")
    max_lambda: Optional[float] = flag(None, "--max-lambda", help="Last threshold of a staged schedule.")
    lambda_stages: int = flag(1, "--lambda-stages", help="Stages of the threshold schedule (1: constant).")
    ranks: Optional[dict] = None           # after training: the ranks left per module

    def check(self, r, h=None, o=None) -> None:
        if not (self.sparse_lambda >= 0 and self.sparse_lambda_2 >= 0 and self.lambda_stages >= 1):
            raise UserError("SoRA needs --sparse-lambda >= 0, --sparse-lambda-2 >= 0 and --lambda-stages >= 1")
        if self.lambda_stages > 1 and self.max_lambda is None:
            raise UserError("SoRA's --lambda-stages > 1 needs --max-lambda, the last threshold")


SETTINGS = SoRASettings
