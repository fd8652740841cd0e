package Net::Async::HTTP::Server::Request;

# One request received by Net::Async::HTTP::Server (see there). Accessors read the parsed
# HTTP::Request; respond( $http_response ) answers it. A streamed answer is
# respond_chunk_header( $response ), then write_chunk( $data ) as often as needed, then
# write_chunk_eof.

use strict;
use warnings;

use Carp qw( croak );
use URI;

our $VERSION = '0.14';

my $CRLF = "\x0d\x0a";

sub new
{
   my $class = shift;
   my ( $conn, $http_request ) = @_;

   return bless {
      conn   => $conn,
      req    => $http_request,
      output => "",
   }, $class;
}

sub as_http_request { $_[0]->{req} }
sub stream          { $_[0]->{conn} }
sub method          { $_[0]->{req}->method }
sub protocol        { $_[0]->{req}->protocol }
sub body            { $_[0]->{req}->content }
sub is_closed       { $_[0]->{is_closed} }

sub path
{
   my $self = shift;
   return $self->{req}->uri->path;
}

sub query_string
{
   my $self = shift;
   return $self->{req}->uri->query;
}

sub query_form
{
   my $self = shift;
   return $self->{req}->uri->query_form;
}

sub query_param_names
{
   my $self = shift;
   my @form = $self->query_form;
   my %seen;
   return grep { !$seen{$_}++ } @form[ grep { $_ % 2 == 0 } 0 .. $#form ];
}

sub query_param
{
   my $self = shift;
   my ( $name ) = @_;
   my %params = $self->query_form;
   return $params{$name};
}

sub query_params
{
   my $self = shift;
   return { $self->query_form };
}

sub header
{
   my $self = shift;
   my ( $name ) = @_;
   return scalar $self->{req}->header( $name );
}

sub headers
{
   my $self = shift;
   my @headers;
   $self->{req}->headers->scan( sub { push @headers, [ @_ ] } );
   return @headers;
}

sub peer
{
   my $self = shift;
   my $conn = $self->{conn} or return;
   return $conn->read_handle;
}

sub _bytes
{
   my ( $data ) = @_;
   $data //= "";
   utf8::downgrade( $data, 1 ) or utf8::encode( $data );
   return $data;
}

sub _status_and_headers
{
   my $self = shift;
   my ( $response ) = @_;

   my $protocol = $response->protocol // $self->protocol // "HTTP/1.1";
   my $code = $response->code // 200;
   my $message = $response->message // HTTP::Status::status_message( $code ) // "";

   return "$protocol $code $message$CRLF" . $response->headers->as_string( $CRLF ) . $CRLF;
}

sub _decide_close
{
   my $self = shift;
   my ( $response ) = @_;

   my $asked = lc( $self->{req}->header( "Connection" ) // "" );
   my $answered = lc( $response->header( "Connection" ) // "" );
   $self->{close} = 1 if $asked =~ m/\bclose\b/ or $answered =~ m/\bclose\b/;
   $self->{close} = 1 if ( $self->protocol // "" ) eq "HTTP/1.0" and $asked !~ m/\bkeep-alive\b/;
}

sub respond
{
   my $self = shift;
   my ( $response ) = @_;

   croak "This request has already been answered" if $self->{is_done} or $self->{streaming};
   return if $self->{is_closed};

   require HTTP::Status;
   my $content = _bytes( $response->content );
   my $code = $response->code // 200;
   if( !defined $response->header( "Content-Length" ) and $code >= 200 and $code != 204 and $code != 304 ) {
      $response->header( "Content-Length" => length $content );
   }
   $self->_decide_close( $response );

   $self->{output} .= _bytes( $self->_status_and_headers( $response ) );
   $self->{output} .= $content unless $self->method eq "HEAD";
   $self->done;
}

sub respond_chunk_header
{
   my $self = shift;
   my ( $response ) = @_;

   croak "This request has already been answered" if $self->{is_done} or $self->{streaming};
   return if $self->{is_closed};

   require HTTP::Status;
   $response->header( "Transfer-Encoding" => "chunked" );
   $response->remove_header( "Content-Length" );
   $self->_decide_close( $response );
   $self->{streaming} = 1;
   $self->{output} .= _bytes( $self->_status_and_headers( $response ) );
   $self->_flush;
}

sub write
{
   my $self = shift;
   my ( $data ) = @_;
   return if $self->{is_closed};
   $self->{output} .= _bytes( $data );
   $self->_flush;
}

sub write_chunk
{
   my $self = shift;
   my ( $data ) = @_;
   $data = _bytes( $data );
   return unless length $data;
   $self->write( sprintf( "%X", length $data ) . $CRLF . $data . $CRLF );
}

sub write_chunk_eof
{
   my $self = shift;
   $self->{output} .= "0$CRLF$CRLF";
   $self->done;
}

sub done
{
   my $self = shift;
   $self->{is_done} = 1;
   $self->_flush;
}

sub _flush
{
   my $self = shift;
   my $conn = $self->{conn} or return;
   $conn->_flush_requests;
}

sub _take_output
{
   my $self = shift;
   my $output = $self->{output};
   $self->{output} = "";
   return $output;
}

sub _wants_close { $_[0]->{close} }

1;
