from portdaddy.cli.main import main

main()
