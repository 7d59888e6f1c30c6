"""`python -m baaaht.services.credentials --config FILE`: the credential manager as its own process."""

from baaaht.bus.runner import main
from baaaht.services.credentials.service import CredentialService

if __name__ == "__main__":
    main(CredentialService)
