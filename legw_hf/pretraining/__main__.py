from ..shutdown import exit_process
from .program import main

exit_process(main())
