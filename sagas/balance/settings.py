"""The balance saga's settings: where its git repositories are (GitLab or local folders) and the
RabbitMQ names of its calculation contract (docs/balance.md).

Read from the same variables as the core settings (`BalanceSettings.from_settings(settings)`);
`load_settings` checks them at start-up once this module is imported.
"""
from __future__ import annotations

from orchestrator.config import AreaSettings, HttpUrl, PositiveSeconds


class BalanceSettings(AreaSettings):
    """Variables: the field names in upper case (GITLAB_URL, GIT_REPOS_DIR, ...)."""

    gitlab_url: HttpUrl = ""
    gitlab_token: str = ""
    gitlab_timeout: PositiveSeconds = 10.0  # 0 would fail every request to GitLab
    # Local git repositories served when no GitLab is configured (project path = folder path)
    git_repos_dir: str = "./data/repos"
    # The calculation workers' contract (docs/balance.md)
    calculation_exchange: str = "orchestrator.calculations"
    calculation_results_queue: str = "orchestrator.calculation-results"
