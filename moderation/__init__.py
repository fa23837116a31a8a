"""Image copy detection for content moderation.

The library behind the Airflow DAGs and the ``moderation`` CLI. It never
imports Airflow. See README.md for the architecture.
"""

__version__ = "0.1.0"
