"""`python -m baaaht.services.scheduler --config FILE`: the task scheduler as its own process."""

from baaaht.bus.runner import main
from baaaht.services.scheduler.service import SchedulerService

if __name__ == "__main__":
    main(SchedulerService)
