from portdaddy.cli.entry import main

main()
