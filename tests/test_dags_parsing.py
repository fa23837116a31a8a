"""Parsing the DAG files is cheap: the dag-processor re-parses every file every few minutes.

A fresh interpreter parses the DAGs folder the way the dag-processor does
(Airflow's BundleDagBag, honouring ``dags/.airflowignore``) after Airflow
itself has been imported and has parsed a throwaway DAG (its own lazy
imports are not the DAG files' cost). Afterwards none of the heavy libraries
the tasks use may be loaded, and the CPU time of parsing our files must stay
under a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "faiss", "great_expectations", "pandas", "cv2", "sklearn")
DAG_IDS = {"background_stats_refresh", "reference_index_nightly", "query_matching_daily", "sscd_retrain"}

pytestmark = pytest.mark.airflow

_PROBE = textwrap.dedent('''
    import json, resource, sys, tempfile
    from pathlib import Path

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    from airflow.dag_processing.dagbag import BundleDagBag

    # A throwaway DAG using the same Airflow features pays Airflow's own lazy imports up front.
    warm = Path(tempfile.mkdtemp())
    (warm / "warm_dag.py").write_text(
        "from datetime import datetime\\n"
        "from airflow.sdk import Asset, AssetOrTimeSchedule, Connection, CronTriggerTimetable, Param, dag, task\\n"
        "from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException\\n"
        "@dag(dag_id='warm', start_date=datetime(2026, 1, 1), params={'p': Param(1, type='integer')},\\n"
        "     schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable('0 1 * * *', timezone='UTC'),\\n"
        "                                  assets=Asset(name='w', uri='x-w://w')))\\n"
        "def warm():\\n"
        "    @task(outlets=[Asset(name='o', uri='x-w://o')])\\n"
        "    def a(x):\\n"
        "        return x\\n"
        "    a.expand(x=[1])\\n"
        "warm()\\n")
    BundleDagBag(dag_folder=str(warm), bundle_path=warm, bundle_name="warm")

    dags, HEAVY = Path(sys.argv[1]), sys.argv[2].split(",")
    before = set(sys.modules)
    start = cpu()
    bag = BundleDagBag(dag_folder=str(dags), bundle_path=dags, bundle_name="dags-folder")
    spent = cpu() - start
    print("PROBE " + json.dumps({
        "cpu_s": spent,
        "dag_ids": sorted(bag.dags),
        "errors": {str(k): str(v)[-2000:] for k, v in bag.import_errors.items()},
        "parsed_files": sorted(Path(f).name for f in bag.file_last_changed),
        "new_modules": sorted(m for m in set(sys.modules) - before if "." not in m),
        "heavy_loaded": [m for m in HEAVY if m in sys.modules],
    }))
''')


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("parse-home")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(REPO / "dags"), ",".join(HEAVY)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


def test_every_dag_parses(probe):
    assert probe["errors"] == {}
    assert set(probe["dag_ids"]) == DAG_IDS


def test_helper_module_is_not_parsed_as_a_dag_file(probe):
    assert "moderation_dag_common.py" not in probe["parsed_files"]
    assert {f"{d}.py" for d in DAG_IDS} <= set(probe["parsed_files"])


def test_parsing_imports_nothing_heavy(probe):
    assert probe["heavy_loaded"] == [], f"parsing the DAG files imported {probe['heavy_loaded']}"


def test_parsing_all_dag_files_takes_under_a_second_of_cpu(probe):
    assert probe["cpu_s"] < 1.0, probe
