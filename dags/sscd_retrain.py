"""SSCD retraining, triggered by hand with validated parameters.

Trains on the GPU queue and pool, evaluates on the validation set under
``validation/`` (when present) against the model in force, publishes a model
version with its metrics and raw 90%-precision threshold, and promotes it
when asked and it beats the incumbent (or when forced). A promotion emits
``moderation_model`` carrying the version: the statistics DAG refits for it,
which rebuilds (and calibrates) the index; matching keeps the previous model
until that index is published, so it never mixes models.

Trigger: ``airflow dags trigger sscd_retrain --conf '{"epochs": 2, "promote": true}'``
or the Trigger form in the UI.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException

import moderation_dag_common as common
from moderation import layout

# moderation.orchestration (torch, FAISS, great-expectations, pandas) is imported inside each task:
# the dag-processor parses this file every few minutes and must not pay for it.


@dag(
    dag_id="sscd_retrain",
    schedule=None,
    start_date=common.START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=common.DEFAULT_ARGS,
    tags=[*common.TAGS, "training"],
    params={
        "backbone": Param("auto", type="string", enum=["auto", "mobilenet_v2", "resnet50", "resnext101"],
                          description="auto: resnet50 on a GPU, mobilenet_v2 on a CPU."),
        "epochs": Param(1.0, type="number", exclusiveMinimum=0, maximum=1000,
                        description="Passes over the training pool (images under the prefix + generated)."),
        "max_steps": Param(0, type="integer", minimum=0, description="Cap on optimiser steps; 0: none."),
        "batch_size": Param(32, type="integer", minimum=2, maximum=8192,
                            description="Images per optimiser step over all processes."),
        "learning_rate": Param(1e-3, type="number", exclusiveMinimum=0, maximum=10),
        "entropy_weight": Param(10.0, type="number", minimum=0, maximum=1000,
                                description="KoLeo differential-entropy weight."),
        "augmentation": Param("wide", type="string", enum=["advanced", "wide", "light"]),
        "images_prefix": Param(layout.TRAINING_PREFIX, type="string",
                               description="Object prefix of the training images."),
        "generated_images": Param(1000, type="integer", minimum=0, maximum=1_000_000,
                                  description="Procedurally generated images added to the pool."),
        "crop_size": Param(224, type="integer", minimum=32, maximum=1024),
        "projection_init": Param("pca", type="string", enum=["pca", "orthogonal", "default"],
                                 description="Projection start: PCA of trunk features (1024 views), or random."),
        "validation_prefix": Param(layout.VALIDATION_PREFIX, type="string",
                                   description="Labelled validation set (references/, queries/, "
                                               "background/, ground_truth.csv); empty: none."),
        "promote": Param(True, type="boolean",
                         description="Promote the new model if it beats the incumbent on the validation set."),
        "force_promote": Param(False, type="boolean",
                               description="Promote even without a win. Still needs the validation set: "
                                           "a model in force must carry metrics and a threshold."),
        "image_size": Param(0, type="integer", minimum=0, maximum=1024,
                            description="Inference size of the new model; 0: the size of the model in force."),
    },
    doc_md=__doc__,
)
def sscd_retrain():
    @task(doc_md="Reads: the parameters, the training-image listing. Returns the TrainConfig (steps from "
                 "epochs over the image pool).")
    def plan(params=None, run_id=None):
        from moderation import orchestration

        return common.no_retry(orchestration.plan_training, common.settings(), dict(params), run_id=run_id)

    @task(queue=common.GPU_QUEUE, pool=common.GPU_POOL, retries=1, retry_delay=timedelta(minutes=5),
          execution_timeout=timedelta(hours=48),
          doc_md="GPU queue/pool. Reads: training images, validation/ set, the incumbent model. Writes: "
                 "checkpoints under MODERATION_HOME/train/RUN (a retry resumes), models/MODEL/ and, when "
                 "promoted, models/CURRENT; a model_versions row.")
    def train_evaluate_publish(planned: dict):
        from moderation import orchestration

        return common.no_retry(orchestration.train_and_publish_model, common.settings(), planned)

    @task(outlets=[common.MODEL_ASSET],
          doc_md="Emits moderation_model {model_version} when the model was promoted (rebuilds statistics "
                 "and index for it); skipped otherwise.")
    def announce(trained: dict, outlet_events=None):
        if not trained["promoted"]:
            raise AirflowSkipException(f"model {trained['model_version']} published, not promoted")
        outlet_events[common.MODEL_ASSET].extra = {"model_version": trained["model_version"],
                                                   "previous": trained["previous"]}
        return trained

    announce(train_evaluate_publish(plan()))


sscd_retrain()
