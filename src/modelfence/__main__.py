from modelfence.cli import main

main()
