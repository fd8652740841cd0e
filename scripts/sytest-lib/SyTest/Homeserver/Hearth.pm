# A Hearth started by SyTest (see SyTest::HomeserverFactory::Hearth).
use strict;
use warnings;

require SyTest::Homeserver::Manual;

package SyTest::Homeserver::Hearth;
use base qw( SyTest::Homeserver::Manual );

use Future;

# SyTest's mail server (SyTest::MailServer::Protocol) speaks only part of SMTP: it sends no
# greeting and knows HELO but not EHLO, QUIT, RSET or NOOP, which Python's smtplib gets by
# without and Hearth's SMTP client (lettre) does not. The missing parts are added here, in the
# test harness only, so that SyTest's email tests reach Hearth.
require SyTest::MailServer::Protocol;
{
   package SyTest::MailServer::Protocol;
   no warnings 'redefine';

   sub _add_to_loop
   {
      my $self = shift;
      $self->IO::Async::Stream::_add_to_loop( @_ );
      $self->send_reply( 220, "sytest" );
   }

   sub on_EHLO { $_[0]->send_reply( 250, "hi" ) }
   sub on_NOOP { $_[0]->send_reply( 250, "ok" ) }

   sub on_RSET
   {
      my ( $self ) = @_;
      $self->{mail_from} = $self->{rcpt_to} = undef;
      $self->send_reply( 250, "ok" );
   }

   sub on_QUIT
   {
      my ( $self ) = @_;
      $self->send_reply( 221, "bye" );
      $self->close_when_empty;
   }
}

sub start
{
   my $self = shift;

   my $command = $ENV{SYTEST_HEARTH_START}
      or return Future->fail( "SYTEST_HEARTH_START names no command to start Hearth with" );

   my $smtp = $self->{smtp_server_config};
   local $ENV{SYTEST_HEARTH_APPSERVICES} = join ":", @{ $self->{app_service_config_files} // [] };
   local $ENV{SYTEST_HEARTH_SMTP} = $smtp ? "$smtp->{host}:$smtp->{port}" : "";
   my $captcha = $self->{recaptcha_config} // {};
   local $ENV{SYTEST_HEARTH_RECAPTCHA_URL} = $captcha->{siteverify_api} // "";
   local $ENV{SYTEST_HEARTH_RECAPTCHA_PUBLIC_KEY} = $captcha->{public_key} // "";
   local $ENV{SYTEST_HEARTH_RECAPTCHA_PRIVATE_KEY} = $captcha->{private_key} // "";

   # It returns once Hearth answers through its TLS front; the processes stay behind it.
   system( $command ) == 0
      or return Future->fail( "$command failed (status $?)" );

   return Future->done;
}

1;
