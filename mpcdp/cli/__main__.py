from mpcdp.cli.app import main

main()
