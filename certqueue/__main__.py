from certqueue.cli import main

main()
