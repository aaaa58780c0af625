from compactedit_cli.cli import main

main()
