"""The kitchen network (orders → kitchen → courier, with priorities) on the
embedded default, or on whatever ``TRANSPORT_URL`` names — see
``transport/demo.py`` for the ensembles' code. Run: ``make demo``."""

from transport.demo import main

if __name__ == "__main__":
    main()
