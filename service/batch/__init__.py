"""Scale-out batch scoring on Ray Data (`python -m service.batch_job`).

* `inputs`: what an input file holds (long or wide layout) and the per-block window builder.
* `scoring`: the model pinned at submission, and the actor that scores windows with the service's
  own `ModelPool` + `Predictor` (same pre/post-processing as the HTTP endpoints).
* `job`: the Ray Data pipeline, read -> co-locate series -> windows -> score -> Parquet.

Ray is imported lazily (only `job` needs it) so the CLI answers bad input before starting it.
"""


class JobError(Exception):
    """Input the job cannot run on (missing file, unknown model, bad layout): the CLI prints the
    message and exits with status 2. Per-series problems are never a JobError: they become rows
    of the errors file."""
