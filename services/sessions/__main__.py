"""`python -m baaaht.services.sessions --config FILE`: the session manager as its own process."""

from baaaht.bus.runner import main
from baaaht.services.sessions.service import SessionService

if __name__ == "__main__":
    main(SessionService)
