"""Entry point: python -m services.analytics"""

import asyncio

from services.analytics.app import create_server
from services.analytics.settings import AnalyticsSettings
from services.common.runner import run_service

if __name__ == "__main__":
    asyncio.run(run_service(AnalyticsSettings(), create_server))
